"""Header values read as numbers, and the error for one that does not parse.

Every number ingest takes from a header goes through these readers. A value that is not
what its attribute needs is an :class:`~radcache.embeddings.errors.InvalidHeaderError`
that names the attribute (``(0028,0010) Rows``) and what was expected, and never quotes
the value: a malformed header may hold anything, a patient's name included. The
exception a failed conversion raised (whose text quotes the value) is not chained.

pydicom logs what it finds malformed, quoting the value (``Invalid value for VR IS:
'DOE^JOHN'``): importing this module puts a filter on pydicom's loggers that blanks
whatever its records quote and drops its DEBUG and INFO traces of the bytes it reads.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ..errors import InvalidHeaderError

__all__ = [
    "PYDICOM_LOGGERS",
    "attribute",
    "finite",
    "float_of",
    "floats_of",
    "integer",
    "ints_of",
    "malformed",
    "one_of",
    "uint_of",
    "unsigned",
]


def attribute(keyword: str) -> str:
    """How messages name a header attribute: ``(0028,0010) Rows``."""
    tag = tag_for_keyword(keyword)
    return keyword if tag is None else f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {keyword}"


def malformed(keyword: str, expected: str, path: str | None) -> InvalidHeaderError:
    """The error for a header value that does not parse: it names the attribute and what
    was expected, and never quotes the value."""
    return InvalidHeaderError(
        f"{attribute(keyword)}: expected {expected}. Fix the header at the source or "
        "re-export the file.",
        path=path,
    )


T = TypeVar("T", int, float)


def finite(v: Any) -> float:
    """``v`` as a finite float (a cast for :func:`one_of`)."""
    f = float(v)
    if not math.isfinite(f):
        raise ValueError("not finite")
    return f


def integer(v: Any) -> int:
    """``v`` as an int, refusing fractions (a cast for :func:`one_of`)."""
    if isinstance(v, float) and not v.is_integer():
        raise ValueError("not an integer")
    return int(v)


def unsigned(v: Any) -> int:
    """``v`` as an int of at least 0 (a cast for :func:`one_of`)."""
    i = integer(v)
    if i < 0:
        raise ValueError("negative")
    return i


_KINDS: dict[Callable[[Any], Any], str] = {
    finite: "a decimal number",
    integer: "an integer",
    unsigned: "an unsigned integer",
}


def one_of(value: Any, kw: str, path: str, cast: Callable[[Any], T]) -> T | None:
    """A single-valued number, None when absent or empty; else :func:`malformed`."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, MultiValue | list | tuple):
            (value,) = value
        return cast(value)
    except (TypeError, ValueError, OverflowError):
        raise malformed(kw, _KINDS[cast], path) from None


def uint_of(ds: Dataset, kw: str, path: str, default: int) -> int:
    """Unsigned integer attribute ``kw`` of ``ds`` (``default`` when absent)."""
    got = one_of(ds.get(kw), kw, path, unsigned)
    return default if got is None else got


def float_of(value: Any, kw: str, path: str, default: float) -> float:
    """A finite decimal ``value`` of attribute ``kw`` (``default`` when absent)."""
    got = one_of(value, kw, path, finite)
    return default if got is None else got


def ints_of(value: Any, kw: str, path: str) -> int | tuple[int, ...] | None:
    """An IS value that may be multi-valued (echo numbers), as ints."""
    if isinstance(value, MultiValue | list | tuple) and len(value) > 1:
        return tuple(one_of(v, kw, path, integer) or 0 for v in value)
    return one_of(value, kw, path, integer)


def floats_of(value: Any, n: int, kw: str, path: str, *, shared: bool = False) -> np.ndarray | None:
    """``n`` finite floats, or None when absent. ``shared``: one read-only array for every
    file that has the same values (orientations, pixel spacings), to keep held headers
    small."""
    if value is None or value == "" or (isinstance(value, MultiValue | list) and not value):
        return None
    try:
        floats = tuple(
            finite(v) for v in (value if isinstance(value, MultiValue | list) else [value])
        )
    except (TypeError, ValueError, OverflowError):
        floats = ()
    if len(floats) != n:
        raise malformed(kw, f"{n} decimal numbers", path)
    return _shared_array(floats) if shared else np.asarray(floats, dtype=np.float64)


@functools.lru_cache(maxsize=1024)
def _shared_array(values: tuple[float, ...]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    arr.flags.writeable = False
    return arr


_QUOTED = re.compile(r"b?'(?:[^'\\]|\\.)*'" + r'|b?"(?:[^"\\]|\\.)*"')  # 'x', "x", b'x'
#: The loggers pydicom writes to (``pydicom``, and the pixel modules' own).
PYDICOM_LOGGERS = (
    "pydicom",
    "pydicom.pixels.decoders.base",
    "pydicom.pixels.encoders.base",
    "pydicom.pixels.utils",
)


class _Unquoted(logging.Filter):
    """pydicom's warnings without what they quote; its DEBUG and INFO records dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        record.msg, record.args = _QUOTED.sub("'…'", record.getMessage()), None
        return True


_UNQUOTED = _Unquoted()
for _name in PYDICOM_LOGGERS:
    logging.getLogger(_name).addFilter(_UNQUOTED)
