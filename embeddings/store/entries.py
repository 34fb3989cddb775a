"""Entries: one embedded volume each, under ``entries/<key>/``.

:class:`EntryInfo` is an entry's metadata; :class:`EntryWriter` fills an entry's arrays
piece by piece (optionally on a background thread) and hands it to its store to commit.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import numpy as np
import zarr

from ..errors import StoreError
from ._common import _group, _meta, _now
from .backend import Backend
from .files import REF_FIELDS, same_ref

__all__ = [
    "ARRAY_KINDS",
    "DIMS",
    "SEQUENCE_PATCH_DIMS",
    "EntryInfo",
    "EntryWriter",
    "Kind",
    "WritableStore",
    "carried",
]

ARRAY_KINDS = ("cls", "mean_patch", "pooled", "positions", "slice_index", "cls_last", "patch")
Kind = Literal["cls", "mean_patch", "pooled", "positions", "slice_index", "cls_last", "patch"]
#: Dimension names written into the Zarr metadata, so xarray can open entries directly.
DIMS: dict[str, tuple[str, ...]] = {
    "cls": ("slice", "feature"),
    "mean_patch": ("slice", "feature"),
    "pooled": ("feature",),
    "positions": ("slice", "xyz"),
    "slice_index": ("slice",),
    "cls_last": ("slice", "block", "feature"),
    "patch": ("slice", "patch_row", "patch_col", "feature"),
}
SEQUENCE_PATCH_DIMS = ("slice", "sequence", "patch_row", "patch_col", "feature")
_PATCH_SHARD = 32
_WRITES_BEHIND = 2  # background writes one EntryWriter may have outstanding


@functools.cache
def _background() -> ThreadPoolExecutor:
    """The thread that runs writes a caller does not wait for (see EntryWriter.put)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="radcache-store")


@dataclass(frozen=True)
class EntryInfo:
    """Metadata of one stored entry (no arrays); every field is non-identifying."""

    key: str
    study: str
    series: str
    part: str
    n_slices: int
    dim: int
    model: str
    weights_hash: str
    recipe_hash: str
    precision: str
    space: str
    kinds: tuple[str, ...]
    created: str
    attrs: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def modality(self) -> str | None:
        return cast(str | None, self.attrs.get("volume", {}).get("modality"))

    @property
    def patient(self) -> str | None:
        return cast(str | None, self.attrs.get("volume", {}).get("patient"))

    @classmethod
    def from_attrs(cls, key: str, a: Mapping[str, Any]) -> EntryInfo:
        vol = a.get("volume", {})
        return cls(
            key=key,
            study=vol.get("study", ""),
            series=vol.get("series", ""),
            part=vol.get("part", ""),
            n_slices=int(a["n_slices"]),
            dim=int(a["model"]["dim"]),
            model=str(a["model"]["name"]),
            weights_hash=str(a["model"]["weights_hash"]),
            recipe_hash=str(a["recipe_hash"]),
            precision=str(a["precision"]),
            space=str(a["space"]),
            kinds=tuple(a.get("kinds", ())),
            created=str(a.get("created", "")),
            attrs=a,
        )


class WritableStore(Protocol):
    """What an :class:`EntryWriter` needs of its store (an ``EmbeddingStore``)."""

    root: zarr.Group
    backend: Backend

    def _commit(
        self, writer: EntryWriter, attrs: dict[str, Any], pooled: np.ndarray, cls: np.ndarray
    ) -> EntryInfo: ...


class EntryWriter:
    """One entry being written: arrays are filled piece by piece, metadata comes last."""

    def __init__(
        self, store: WritableStore, key: str, layout: Mapping[str, tuple[tuple[int, ...], Any]]
    ) -> None:
        self.store, self.key = store, key
        # A backend that stages writes gives each writer a private group that commit()
        # renames into place, so concurrent writers of one key never see each other's arrays.
        self.path = store.backend.write_path(key)
        #: What an in-place write overwrites (the entry, if complete), for :func:`carried`.
        self.previous = None if self.path != f"entries/{key}" else _complete(store.root, key)
        self.group = store.root.create_group(self.path, overwrite=True)
        self.arrays = {
            name: _create(self.group, name, shape, np.dtype(dt))
            for name, (shape, dt) in layout.items()
        }
        self._behind: deque[Future[None]] = deque()

    def put(self, name: str, start: int, values: np.ndarray, *, wait: bool = True) -> None:
        """Write ``values`` at rows ``start:`` of array ``name`` (the whole array if 0-d).

        With ``wait=False`` the write runs on a background thread while the caller goes on
        (the model's next batch): the caller must not change ``values`` afterwards. At most
        two such writes are outstanding per entry; :meth:`commit` waits for all of them and
        raises their errors.
        """
        if wait:
            self._write(name, start, values)
            return
        while len(self._behind) >= _WRITES_BEHIND:
            self._behind.popleft().result()
        self._behind.append(_background().submit(self._write, name, start, values))

    def _write(self, name: str, start: int, values: np.ndarray) -> None:
        arr = self.arrays[name]
        if values.size == 0:
            return
        if arr.ndim == 0 or (start == 0 and values.shape == arr.shape):
            arr[...] = values
            return
        # zarr clips an out-of-range slice and drops the rest silently: check first.
        if start < 0 or start + values.shape[0] > arr.shape[0] or values.shape[1:] != arr.shape[1:]:
            raise StoreError(
                f"rows {start}:{start + values.shape[0]} of shape {values.shape[1:]} do not fit "
                f"array {name!r} of shape {arr.shape} in entry {self.key}; this is a bug in "
                "the caller."
            )
        arr[start : start + values.shape[0]] = values

    def commit(self, attrs: dict[str, Any], pooled: np.ndarray, cls: np.ndarray) -> EntryInfo:
        """Make the entry visible, then add it to its table."""
        while self._behind:
            self._behind.popleft().result()
        full = {**attrs, "kinds": sorted(self.arrays), "created": _now(), "complete": True}
        return self.store._commit(self, full, pooled, cls)


def _complete(root: zarr.Group, key: str) -> dict[str, Any] | None:
    try:
        attrs = _meta(_group(root[f"entries/{key}"]))
    except KeyError:
        return None
    return attrs if attrs.get("complete") else None


def carried(old: Mapping[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """The metadata of an entry that replaces ``old`` (the same content embedded again for
    richer patch grids): the old entry's names, aliases, labels and collections stay, and
    the names it is now sent under join its aliases."""
    if old is None:
        return new
    aliases = list(old.get("aliases", []))
    ref = {k: new.get("volume", {}).get(k) for k in REF_FIELDS}
    if not any(same_ref(a, ref) for a in (old.get("volume", {}), *aliases)):
        aliases.append(ref)
    kept = {k: old[k] for k in ("labels", "collections") if k in old}
    return {**new, **kept, "volume": old.get("volume", new.get("volume")), "aliases": aliases}


def _create(
    group: zarr.Group, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]
) -> zarr.Array[Any]:
    if name in ("patch", "patch_scale"):  # a chunk per slice, in shards of up to 32 slices
        shard = (max(1, min(shape[0], _PATCH_SHARD)), *shape[1:])
        # MM-DINOv2 entries keep one grid per sequence: (slice, sequence, h, w, D); an int8
        # grid's per-token scales (patch_scale) have no feature axis.
        dims = SEQUENCE_PATCH_DIMS if len(shape) == 5 - (name == "patch_scale") else DIMS["patch"]
        dims = dims[:-1] if name == "patch_scale" else dims
        return group.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=(1, *shape[1:]),
            shards=shard,
            compressors=None,
            # Patch tokens are never all fill value: skip zarr's per-chunk emptiness scan,
            # which took three quarters of the write time.
            config={"write_empty_chunks": True},
            dimension_names=dims,
        )
    return group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=tuple(max(1, int(d)) for d in shape),
        dimension_names=DIMS.get(name),
    )
