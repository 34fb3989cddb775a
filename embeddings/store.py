"""Store: embeddings in one Zarr v3 store (a local directory or any fsspec URL).

Entry point :func:`open_store`. Layout (documented for readers without radcache in
docs/STORE.md)::

    <root>/zarr.json                    attrs.radcache = {format, pseudonym_fingerprint, …}
    <root>/entries/<key>/               one embedded volume; attrs.radcache = metadata
        cls        (n, D)      float32  CLS token per slice
        mean_patch (n, D)      float32  mean patch token per slice
        pooled     (D,)        float32  mean of slice CLS (the series vector)
        positions  (n, 3)      float64  LPS position of each embedded slice
        slice_index (n,)       int32    index of each embedded slice in the volume
        cls_last   (n, k, D)   float32  optional: CLS of the last k blocks (after norm)
        patch      (n, h, w, D) float16 optional: patch tokens, one chunk per slice
    <root>/tables/<space>/              every entry of one (model, recipe) space, appendable
        keys   (N, 2) uint64   entry keys (128-bit)
        pooled (N, D) float32  series vectors
        offsets (N+1,) int64   rows of ``cls`` belonging to entry i: offsets[i]:offsets[i+1]
        cls    (S, D) float32  all slice CLS tokens, concatenated

An entry becomes visible only when its metadata, written last, says ``complete``; a table
row only when the table's ``count`` (written last) covers it. A crash mid-write leaves
nothing visible, and the next write of the same key replaces the debris.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import zarr
import zarr.storage

from .errors import AmbiguousReferenceError, NotFoundError, StoreError, StoreMismatchError
from .locks import Locks

__all__ = [
    "ARRAY_KINDS",
    "STORE_FORMAT",
    "EmbeddingStore",
    "EntryInfo",
    "EntryWriter",
    "Table",
    "open_store",
]

STORE_FORMAT = 1
ARRAY_KINDS = ("cls", "mean_patch", "pooled", "positions", "slice_index", "cls_last", "patch")
Kind = Literal["cls", "mean_patch", "pooled", "positions", "slice_index", "cls_last", "patch"]
_TABLE_CHUNK = 4096
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


_STALE_STAGING_S = 24 * 3600
#: Content label of a file that made more than one volume (later rows override earlier).
SHARED_FILE = "0" * 32


def _owner() -> str:
    """Who writes a staging folder: ``host-pid``, so that a sweeper on the same host can
    tell whether the writer still runs."""
    return f"{socket.gethostname().replace('.', '_').replace('-', '_')}-{os.getpid()}"


def _dead(owner: str) -> bool:
    """True if ``owner`` (``host-pid``) is a process of this host that no longer runs."""
    host, _, pid = owner.rpartition("-")
    if host != _owner().rpartition("-")[0] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _sweep_staging(staging: Path) -> None:
    """Remove unfinished writes of processes of this host that have died, and of any
    process more than a day ago."""
    if not staging.is_dir():
        return
    cutoff = time.time() - _STALE_STAGING_S
    for d in staging.iterdir():
        parts = d.name.split(".")
        with contextlib.suppress(OSError):
            if d.is_dir() and ((len(parts) == 3 and _dead(parts[1])) or d.stat().st_mtime < cutoff):
                shutil.rmtree(d)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


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


@dataclass
class Table:
    """All series-level vectors of one space, read in one pass."""

    space: str
    keys: list[str]
    pooled: np.ndarray  # (N, D)
    offsets: np.ndarray  # (N+1,)
    cls: np.ndarray  # (S, D)
    attrs: Mapping[str, Any]

    def slice_cls(self, i: int) -> np.ndarray:
        return self.cls[self.offsets[i] : self.offsets[i + 1]]


class EntryWriter:
    """One entry being written: arrays are filled piece by piece, metadata comes last."""

    def __init__(
        self, store: EmbeddingStore, key: str, layout: Mapping[str, tuple[tuple[int, ...], Any]]
    ) -> None:
        self.store, self.key = store, key
        # Local stores write into a private staging group that commit() renames into
        # place, so concurrent writers of one key never see each other's arrays.
        self.path = (
            f"staging/{key}.{_owner()}.{uuid.uuid4().hex}" if store.local_path else f"entries/{key}"
        )
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


def _create(
    group: zarr.Group, name: str, shape: tuple[int, ...], dtype: np.dtype[Any]
) -> zarr.Array[Any]:
    if name == "patch":  # one chunk per slice, grouped in shards of up to 32 slices
        shard = (max(1, min(shape[0], _PATCH_SHARD)), *shape[1:])
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
            # MM-DINOv2 entries keep one grid per sequence: (slice, sequence, h, w, D).
            dimension_names=DIMS[name] if len(shape) == 4 else SEQUENCE_PATCH_DIMS,
        )
    return group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=tuple(max(1, int(d)) for d in shape),
        dimension_names=DIMS.get(name),
    )


def space_id(model_name: str, weights_hash: str, recipe_hash: str) -> str:
    """Name of the table holding one (model weights, recipe) space."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)[:48]
    return f"{safe}.{weights_hash[:8]}.{recipe_hash[:8]}"


def _key_words(key: str) -> tuple[int, int]:
    v = int(key, 16)
    return v >> 64, v & ((1 << 64) - 1)


def _words_key(hi: int, lo: int) -> str:
    return f"{(int(hi) << 64) | int(lo):032x}"


class EmbeddingStore:
    """Read and write radcache entries in a Zarr v3 store."""

    def __init__(
        self,
        url: str | Path,
        *,
        mode: Literal["r", "a"] = "a",
        storage_options: dict[str, Any] | None = None,
        locks: Locks | None = None,
    ) -> None:
        """``locks`` coordinate writers of an object store (see :mod:`.locks`); local
        stores lock with ``flock`` and ignore them."""
        self.url = str(url)
        self.locks = locks
        self.read_only = mode == "r"
        self._lock = threading.RLock()
        self.local_path: Path | None = None
        self._lock_depth = 0
        self._table_keys: dict[str, set[str]] = {}
        self._files: dict[str, str] = {}
        self._files_count = 0
        store: zarr.storage.FsspecStore | zarr.storage.LocalStore
        if "://" in self.url and not self.url.startswith("file://"):
            store = zarr.storage.FsspecStore.from_url(
                self.url, storage_options=storage_options, read_only=self.read_only
            )
        else:
            path = Path(self.url.removeprefix("file://")).expanduser()
            if self.read_only and not (path / "zarr.json").exists():
                raise NotFoundError(
                    f"no radcache store at {path}; expected a directory made by "
                    "`radcache embed --store`."
                )
            store = zarr.storage.LocalStore(path, read_only=self.read_only)
            self.local_path = path
            if not self.read_only:
                _sweep_staging(path / "staging")
        if self.local_path is not None and not self.read_only:
            self.local_path.mkdir(parents=True, exist_ok=True)  # so the lock file has a home
        with self._writing() if not self.read_only else contextlib.nullcontext():
            # Under the lock: two processes creating one new store must not race.
            try:
                self.root = zarr.open_group(
                    store=store, mode="r" if self.read_only else "a", zarr_format=3
                )
            except Exception as exc:
                raise StoreError(f"could not open the store at {self.url} ({exc}).") from exc
            meta = _meta(self.root)
            if not meta:
                if self.read_only:
                    raise NotFoundError(f"{self.url} is a Zarr store but not a radcache store.")
                meta = {"format": STORE_FORMAT, "created": _now()}
                self.root.attrs["radcache"] = meta
        if int(meta.get("format", 0)) != STORE_FORMAT:
            raise StoreMismatchError(
                f"store {self.url} has format {meta.get('format')}; this radcache reads format "
                f"{STORE_FORMAT}. Use a matching radcache version or a new store."
            )

    # -- identity ----------------------------------------------------------------------
    def bind_pseudonyms(self, fingerprint: str) -> None:
        """Record (first use) or check the fingerprint of the pseudonym secret."""
        if not self.read_only:
            with self._writing():
                self._bind(fingerprint)
        else:
            self._bind(fingerprint)

    def _bind(self, fingerprint: str) -> None:
        # Re-read the root's metadata: another process may have bound it since we opened.
        fresh = zarr.open_group(
            store=self.root.store, mode="r" if self.read_only else "a", zarr_format=3
        )
        self.root = fresh
        meta = _meta(fresh)
        known = meta.get("pseudonym_fingerprint")
        if known is None and not self.read_only:
            meta["pseudonym_fingerprint"] = fingerprint
            self.root.attrs["radcache"] = meta
        elif known is not None and known != fingerprint:
            raise StoreMismatchError(
                f"store {self.url} was written with another pseudonym secret (fingerprint {known}, "
                f"now {fingerprint}); the same study would get a different name. Use the original "
                "secret (RADCACHE_PSEUDONYM_KEY or its key file) or a new store."
            )

    # -- entries -----------------------------------------------------------------------
    def _entries(self) -> zarr.Group | None:
        try:
            g = self.root["entries"]
        except KeyError:
            return None
        return g if isinstance(g, zarr.Group) else None

    def get(self, key: str) -> EntryInfo | None:
        """The complete entry ``key``, or None (missing or half-written)."""
        entries = self._entries()
        if entries is None:
            return None
        try:
            g = entries[key]
        except KeyError:
            return None
        attrs = _meta(_group(g))
        if not attrs.get("complete"):
            return None
        return EntryInfo.from_attrs(key, attrs)

    def begin(self, key: str, layout: Mapping[str, tuple[tuple[int, ...], Any]]) -> EntryWriter:
        """Start writing entry ``key`` with arrays of the given ``{name: (shape, dtype)}``.

        Nothing is visible until :meth:`EntryWriter.commit`; an earlier unfinished write
        of the same key is replaced.
        """
        if self.read_only:
            raise StoreError(f"store {self.url} is open read-only.")
        return EntryWriter(self, key, layout)

    def write(self, key: str, attrs: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> EntryInfo:
        """Write one entry atomically (arrays first, metadata last), then index it in its table."""
        writer = self.begin(key, {name: (a.shape, a.dtype) for name, a in arrays.items()})
        for name, arr in arrays.items():
            writer.put(name, 0, arr)
        return writer.commit(attrs, arrays["pooled"], arrays["cls"])

    def _commit(
        self, writer: EntryWriter, attrs: dict[str, Any], pooled: np.ndarray, cls: np.ndarray
    ) -> EntryInfo:
        key = writer.key
        with self._writing():
            existing = self.get(key)
            if existing is not None:  # another writer finished the same content first
                self._discard(writer)
                self.ensure_indexed(existing)
                return existing
            writer.group.attrs["radcache"] = attrs
            if self.local_path is not None:
                self.root.require_group("entries")
                final = self.local_path / "entries" / key
                if final.exists():  # debris of an interrupted direct write
                    shutil.rmtree(final)
                os.replace(self.local_path / writer.path, final)  # the commit point
            info = EntryInfo.from_attrs(key, attrs)
            self._append(info, pooled, cls)
            return info

    def _discard(self, writer: EntryWriter) -> None:
        if self.local_path is not None and writer.path.startswith("staging/"):
            shutil.rmtree(self.local_path / writer.path, ignore_errors=True)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Exclusive right to commit: this process's threads, and other processes on a
        local store (an flock on ``<store>/.radcache.lock``)."""
        with self._lock:
            if self.local_path is None and self.locks is not None and not self._lock_depth:
                with self.locks.hold("commit"):
                    self._lock_depth = 1
                    try:
                        yield
                    finally:
                        self._lock_depth = 0
                return
            if self.local_path is None or self._lock_depth:  # re-entered: already held
                self._lock_depth += 1
                try:
                    yield
                finally:
                    self._lock_depth -= 1
                return
            with open(self.local_path / ".radcache.lock", "a+b") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                self._lock_depth = 1
                try:
                    yield
                finally:
                    self._lock_depth = 0
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def claim(self, key: str) -> contextlib.AbstractContextManager[None]:
        """The right to write entry ``key``: exclusive across processes on an object store
        with locks (so no two writers fill the same chunks); local stores stage each
        writer privately and need no claim."""
        if self.local_path is None and self.locks is not None:
            return self.locks.hold(f"entry:{key}")
        return contextlib.nullcontext()

    def ensure_indexed(self, info: EntryInfo) -> None:
        """Add an entry to its table if a crash left it out."""
        if info.key not in self._keys_of(info.space):
            with self._writing():
                self._table_keys.pop(info.space, None)  # re-read: another process may have
                if info.key in self._keys_of(info.space):
                    return
                g = _group(self.root[f"entries/{info.key}"])
                pooled, cls = _array(g["pooled"])[...], _array(g["cls"])[...]
                self._append(info, np.asarray(pooled), np.asarray(cls))

    def add_alias(self, key: str, ref: dict[str, str]) -> None:
        """Record another study/series that delivered the same content as entry ``key``."""
        with self._lock:
            g = _group(self.root[f"entries/{key}"])
            attrs = _meta(g)
            aliases = list(attrs.get("aliases", []))
            if ref not in aliases and ref != {k: attrs["volume"].get(k) for k in ref}:
                aliases.append(ref)
                attrs["aliases"] = aliases
                g.attrs["radcache"] = attrs

    def annotate(
        self, key: str, *, labels: Mapping[str, Any] | None = None, collection: str | None = None
    ) -> None:
        """Merge ``labels`` into entry ``key``'s metadata (``attrs.radcache.labels``) and add
        it to ``collection`` (``attrs.radcache.collections``)."""
        if not labels and not collection:
            return
        with self._writing():
            g = _group(self.root[f"entries/{key}"])
            attrs = _meta(g)
            attrs["labels"] = {**attrs.get("labels", {}), **(labels or {})}
            if collection and collection not in attrs.get("collections", []):
                attrs["collections"] = [*attrs.get("collections", []), collection]
            g.attrs["radcache"] = attrs

    def iter_entries(self) -> Iterator[EntryInfo]:
        entries = self._entries()
        if entries is None:
            return
        for key in sorted(entries.group_keys()):
            info = self.get(key)
            if info is not None:
                yield info

    def series(self) -> list[EntryInfo]:
        """Every complete entry with its metadata."""
        return list(self.iter_entries())

    def delete_study(self, study: str) -> list[str]:
        """Remove a study (consent withdrawal); returns the entry keys deleted. Idempotent.

        An entry whose content another study also delivered (an alias) stays, named by
        that study; every other entry of ``study`` goes, with its table rows and its
        re-sent-file record.
        """
        if self.read_only:
            raise StoreError(f"store {self.url} is open read-only.")
        gone: list[EntryInfo] = []
        with self._writing():
            for e in list(self.iter_entries()):
                primary = {k: e.attrs["volume"].get(k) for k in ("study", "series", "part")}
                refs = [primary, *e.attrs.get("aliases", [])]
                keep = [r for r in refs if r.get("study") != study]
                if len(keep) == len(refs):
                    continue
                g = _group(self.root[f"entries/{e.key}"])
                if keep:  # another study delivered the same pixels: it keeps the entry
                    attrs = _meta(g)
                    attrs["volume"] = {**attrs["volume"], **keep[0]}
                    attrs["aliases"] = keep[1:]
                    g.attrs["radcache"] = attrs
                    continue
                gone.append(e)
                content = str(e.attrs.get("content_hash", ""))
                with contextlib.suppress(KeyError):
                    del _group(self.root["volumes"])[content]
                del _group(self.root["entries"])[e.key]
            for space in {e.space for e in gone}:
                self._drop_rows(space, {e.key for e in gone if e.space == space})
        return [e.key for e in gone]

    def _drop_rows(self, space: str, keys: set[str]) -> None:
        """Rewrite a table without ``keys`` (O(table); the index work will add tombstones)."""
        t = self.table(space)
        keep = [i for i, k in enumerate(t.keys) if k not in keys]
        g = _group(self.root[f"tables/{space}"])
        cls = [t.slice_cls(i) for i in keep]
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in cls])]).astype(np.int64)
        new = {
            "keys": np.asarray([_key_words(t.keys[i]) for i in keep], dtype=np.uint64).reshape(
                -1, 2
            ),
            "pooled": t.pooled[keep],
            "cls": np.concatenate(cls) if cls else np.zeros((0, t.pooled.shape[1]), np.float32),
            "offsets": offsets,
        }
        meta = _meta(g)
        g.attrs["radcache"] = {**meta, "count": 0, "slices": 0}  # nothing visible while rewriting
        for name, arr in new.items():
            a = _array(g[name])
            a.resize(arr.shape)
            if arr.size:
                a[...] = arr
        g.attrs["radcache"] = {
            **meta,
            "count": len(keep),
            "slices": int(offsets[-1]),
            "generation": int(meta.get("generation", 0)) + 1,  # rows renumbered: readers resync
        }
        self._table_keys.pop(space, None)

    def resolve(self, ref: str, *, model: str | None = None) -> EntryInfo:
        """An entry by key, or by series name (``series`` or ``series#part``)."""
        info = self.get(ref) if re.fullmatch(r"[0-9a-f]{32}", ref) else None
        if info is not None:
            return info
        series, _, part = ref.partition("#")
        hits = [
            e
            for e in self.iter_entries()
            if (
                e.series == series
                or any(a.get("series") == series for a in e.attrs.get("aliases", []))
            )
            and (not part or e.part == part)
            and (model is None or e.model == model)
        ]
        if not hits:
            raise NotFoundError(
                f"no entry for {ref!r} in {self.url}; `radcache show {self.url}` lists them."
            )
        if len(hits) > 1:
            listing = "; ".join(
                f"{e.key} ({e.model}, recipe {e.recipe_hash}, part {e.part or '-'})" for e in hits
            )
            raise AmbiguousReferenceError(
                f"{ref!r} matches {len(hits)} entries: {listing}. "
                "Pass an entry key, series#part, or a model."
            )
        return hits[0]

    def read(self, ref: str, kind: Kind = "cls", *, model: str | None = None) -> np.ndarray:
        """One array of one entry, as numpy."""
        if kind not in ARRAY_KINDS:
            raise StoreError(
                f"unknown array kind {kind!r}; expected one of {', '.join(ARRAY_KINDS)}."
            )
        info = self.resolve(ref, model=model)
        if kind not in info.kinds:
            raise NotFoundError(
                f"entry {info.key} has no {kind!r} array (it has {', '.join(info.kinds)}); "
                "embed with --patch-tokens to keep patch tokens."
            )
        return np.asarray(_array(self.root[f"entries/{info.key}/{kind}"])[...])

    # -- re-sent files ----------------------------------------------------------------
    # files/ maps keyed file digests to the content hash of the volume they made, and
    # volumes/<content> records that volume's names, so a re-sent study is recognised
    # from its bytes alone, before any DICOM parsing or decoding.
    def remember_files(self, content: str, digests: Iterable[str], record: dict[str, Any]) -> None:
        """Record that exactly the files ``digests`` make the volume with ``content`` hash."""
        if self.read_only:
            return
        with self._writing():
            known = self._file_map()
            wanted = set(digests)
            # A file that made another volume too (a multi-stack multi-frame file) cannot
            # answer for one volume: it is marked SHARED and never recognised.
            new = sorted(
                d for d in wanted if d not in known or known[d] not in (content, SHARED_FILE)
            )
            labels = [content if d not in known else SHARED_FILE for d in new]
            vols = self.root.require_group("volumes")
            if content not in vols:
                vols.create_group(content).attrs["radcache"] = record
            if not new:
                return
            g = self._files_group()
            meta = _meta(g)
            n = int(meta["count"])
            d_a, c_a = _array(g["digest"]), _array(g["content"])
            d_a.resize((n + len(new), 2))
            c_a.resize((n + len(new), 2))
            d_a[n:] = np.asarray([_key_words(d) for d in new], dtype=np.uint64)
            c_a[n:] = np.asarray([_key_words(c) for c in labels], dtype=np.uint64)
            g.attrs["radcache"] = {**meta, "count": n + len(new)}  # the commit point
            known.update(zip(new, labels, strict=True))
            self._files_count = n + len(new)

    def file_index(self) -> Mapping[str, str]:
        """Every known file digest → the content hash of its volume (reloaded if it grew)."""
        return self._file_map()

    def volume_record(self, content: str) -> dict[str, Any] | None:
        try:
            return _meta(_group(self.root[f"volumes/{content}"]))
        except KeyError:
            return None

    def _files_group(self) -> zarr.Group:
        if "files" in self.root:
            return _group(self.root["files"])
        g = self.root.create_group("files")
        for name in ("digest", "content"):
            g.create_array(
                name,
                shape=(0, 2),
                dtype="uint64",
                chunks=(1 << 16, 2),
                dimension_names=("file", "word"),
            )
        g.attrs["radcache"] = {"count": 0}
        return g

    def _file_map(self) -> dict[str, str]:
        try:
            g = _group(self.root["files"])
        except KeyError:
            return self._files
        n = int(_meta(g).get("count", 0))
        if n != self._files_count:  # another writer appended: reload
            words = np.asarray(_array(g["digest"])[:n])
            contents = np.asarray(_array(g["content"])[:n])
            self._files = {
                _words_key(dh, dl): _words_key(ch, cl)
                for (dh, dl), (ch, cl) in zip(words, contents, strict=True)
            }
            self._files_count = n
        return self._files

    # -- tables ------------------------------------------------------------------------
    def spaces(self) -> list[str]:
        try:
            t = self.root["tables"]
        except KeyError:
            return []
        assert isinstance(t, zarr.Group)
        return sorted(t.group_keys())

    def _table_group(self, info: EntryInfo, dim: int) -> zarr.Group:
        tables = self.root.require_group("tables")
        if info.space in tables:
            g = tables[info.space]
            assert isinstance(g, zarr.Group)
            return g
        g = tables.create_group(info.space)
        g.create_array(
            "keys",
            shape=(0, 2),
            dtype="uint64",
            chunks=(_TABLE_CHUNK, 2),
            dimension_names=("series", "word"),
        )
        for name, rows in (("pooled", "series"), ("cls", "slice")):
            g.create_array(
                name,
                shape=(0, dim),
                dtype="float32",
                chunks=(_TABLE_CHUNK, dim),
                dimension_names=(rows, "feature"),
            )
        off = g.create_array(
            "offsets", shape=(1,), dtype="int64", chunks=(_TABLE_CHUNK,), dimension_names=("edge",)
        )
        off[0] = 0
        g.attrs["radcache"] = {
            "count": 0,
            "slices": 0,
            "dim": dim,
            "model": info.model,
            "weights_hash": info.weights_hash,
            "recipe_hash": info.recipe_hash,
            "recipe": info.attrs.get("recipe"),
            "level": "series+slice",
            "table_id": uuid.uuid4().hex,  # tells an index this table from a re-created one
        }
        return g

    def _keys_of(self, space: str) -> set[str]:
        """Entry keys in a table (only its ``keys`` column is read), cached per process."""
        if space not in self._table_keys:
            keys: set[str] = set()
            if space in self.spaces():
                g = _group(self.root[f"tables/{space}"])
                n = int(_meta(g)["count"])
                keys = {_words_key(hi, lo) for hi, lo in np.asarray(_array(g["keys"])[:n])}
            self._table_keys[space] = keys
        return self._table_keys[space]

    def _append(self, info: EntryInfo, pooled: np.ndarray, cls: np.ndarray) -> None:
        g = self._table_group(info, int(pooled.shape[-1]))
        meta = _meta(g)
        n, s = int(meta["count"]), int(meta["slices"])
        keys_a, pooled_a, cls_a, off_a = (g[k] for k in ("keys", "pooled", "cls", "offsets"))
        assert isinstance(keys_a, zarr.Array) and isinstance(pooled_a, zarr.Array)
        assert isinstance(cls_a, zarr.Array) and isinstance(off_a, zarr.Array)
        m = int(cls.shape[0])
        cls_a.resize((s + m, cls_a.shape[1]))
        if m:
            cls_a[s : s + m] = cls
        off_a.resize((n + 2,))
        off_a[n + 1] = s + m
        pooled_a.resize((n + 1, pooled_a.shape[1]))
        pooled_a[n] = pooled
        keys_a.resize((n + 1, 2))
        keys_a[n] = np.asarray(_key_words(info.key), dtype=np.uint64)
        meta.update(count=n + 1, slices=s + m)
        g.attrs["radcache"] = meta  # the commit point
        self._keys_of(info.space).add(info.key)

    def table_meta(self, space: str) -> dict[str, Any]:
        """A table's metadata: ``count`` rows, ``slices``, ``generation`` (bumped whenever
        rows are removed and the rest renumbered), model and recipe."""
        try:
            g = _group(self.root[f"tables/{space}"])
        except KeyError:
            raise NotFoundError(
                f"no table {space!r}; known: {', '.join(self.spaces()) or 'none'}."
            ) from None
        return {"generation": 0, **_meta(g)}

    def table(self, space: str, start: int = 0) -> Table:
        """Rows ``start:`` of a space's table in one pass (rows past the committed count
        ignored). ``offsets`` and ``cls`` then cover those rows only, offsets from 0."""
        meta = self.table_meta(space)
        g = _group(self.root[f"tables/{space}"])
        n, s = int(meta["count"]), int(meta["slices"])
        start = min(start, n)
        words = np.asarray(_array(g["keys"])[start:n])
        offsets = np.asarray(_array(g["offsets"])[start : n + 1])
        first = int(offsets[0])
        return Table(
            space=space,
            keys=[_words_key(hi, lo) for hi, lo in words],
            pooled=np.asarray(_array(g["pooled"])[start:n]),
            offsets=offsets - first,
            cls=np.asarray(_array(g["cls"])[first:s]),
            attrs=meta,
        )

    def entry_attrs(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Metadata of many complete entries (missing or unfinished ones left out); on a local
        store read straight from each entry's ``zarr.json``."""
        out: dict[str, dict[str, Any]] = {}
        for key in keys:
            if self.local_path is not None:
                try:
                    doc = json.loads((self.local_path / "entries" / key / "zarr.json").read_bytes())
                except (OSError, ValueError):
                    continue
                attrs = doc.get("attributes", {}).get("radcache", {})
            else:
                info = self.get(key)
                attrs = dict(info.attrs) if info is not None else {}
            if attrs.get("complete"):
                out[key] = attrs
        return out


def open_store(
    url: str | Path,
    *,
    mode: Literal["r", "a"] = "r",
    storage_options: dict[str, Any] | None = None,
    locks: Locks | None = None,
) -> EmbeddingStore:
    """Open a radcache store: ``.series()`` lists entries, ``.read(ref, kind)`` gives arrays."""
    return EmbeddingStore(url, mode=mode, storage_options=storage_options, locks=locks)
