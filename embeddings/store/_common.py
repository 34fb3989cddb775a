"""Helpers every room of the store uses: reading ``radcache`` attributes, checking node
types, timestamps, and 128-bit keys as two uint64 words."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, cast

import zarr

from ..errors import StoreError


def _meta(node: zarr.Group | zarr.Array[Any]) -> dict[str, Any]:
    """The ``radcache`` attribute of a group or array, as a plain dict ({} if absent)."""
    value = node.attrs.get("radcache", {})
    return dict(cast(Mapping[str, Any], value)) if isinstance(value, Mapping) else {}


def _group(node: object) -> zarr.Group:
    if not isinstance(node, zarr.Group):
        raise StoreError(
            f"expected a Zarr group, found {type(node).__name__}: the store is damaged."
        )
    return node


def _array(node: object) -> zarr.Array[Any]:
    if not isinstance(node, zarr.Array):
        raise StoreError(
            f"expected a Zarr array, found {type(node).__name__}; the store is damaged."
        )
    return node


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _key_words(key: str) -> tuple[int, int]:
    v = int(key, 16)
    return v >> 64, v & ((1 << 64) - 1)


def _words_key(hi: int, lo: int) -> str:
    return f"{(int(hi) << 64) | int(lo):032x}"
