"""The forms patch-token grids may be kept in: ``fp16``, ``int8``, ``pooled:N``, ``none``
(what each keeps: :mod:`.store.patch_codec`). Parsed and ranked here, without the store, so
settings and clients can name them.

A stored form *covers* a requested one when it is at least as rich
(``fp16 > int8 > pooled:N > pooled:M (N > M) > none``).
"""

from __future__ import annotations

import re

from .errors import ConfigError

__all__ = ["DEFAULT_PATCH_STORAGE", "PATCH_STORAGE_PATTERN", "covers", "parse_storage"]

#: The form entries are written in unless asked otherwise (chosen from bench/README.md's
#: figures, patch storage).
DEFAULT_PATCH_STORAGE = "int8"
#: The forms a setting or request may name.
PATCH_STORAGE_PATTERN = r"^(fp16|int8|none|pooled:[1-9][0-9]*)$"


def parse_storage(value: str | bool) -> str:
    """A patch-storage form from a setting, or from the older ``patch_tokens`` flag
    (``True`` is ``fp16``, ``False`` is ``none``)."""
    if isinstance(value, bool):
        return "fp16" if value else "none"
    form = str(value).strip().lower()
    if not re.fullmatch(PATCH_STORAGE_PATTERN, form):
        raise ConfigError(
            f"patch storage {value!r} is not a form radcache knows; expected fp16, int8, "
            "pooled:N (N a positive integer, e.g. pooled:4) or none."
        )
    return form


def _rank(form: str) -> tuple[int, int]:
    if form.startswith("pooled:"):
        return (1, int(form.partition(":")[2]))
    return {"none": (0, 0), "int8": (2, 0), "fp16": (3, 0)}[form]


def covers(stored: str, wanted: str) -> bool:
    """Whether an entry kept in form ``stored`` answers a request for ``wanted``."""
    return _rank(stored) >= _rank(wanted)
