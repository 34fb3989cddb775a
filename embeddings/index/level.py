"""One FAISS index of a space's level: construction, tuning, search, files and helpers.

:func:`choose_factory` picks exact (``Flat``) or IVF by size; :class:`LevelIndex` trains,
adds, tunes ``nprobe`` / ``efSearch`` to the recall target, searches under an id bitmap,
removes ids, and reads / writes its file. A file is read memory-mapped where FAISS can
(``IO_FLAG_MMAP``: flat, IVF, HNSW, PQ), so start-up costs no copy of the vectors; a mapped
index is copied into memory on its first change (FAISS's mapped IVF lists are read-only),
and until then it is saved by linking (or copying) the file it came from.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import shutil
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import SearchIndexError
from ._vectors import Level

__all__ = ["LevelIndex", "choose_factory"]

log = logging.getLogger(__name__)
# FAISS's bundled type stubs are partial and partly wrong; it is used untyped.
faiss: Any = importlib.import_module("faiss")

_RECALL_K = 10
_HELD_OUT = 500
_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_EFSEARCH = (16, 32, 64, 128, 256, 512, 1024)


def choose_factory(n: int, *, exact_max: int) -> str:
    """``Flat`` (exact) up to ``exact_max`` vectors, else ``IVF<nlist>,Flat`` with
    nlist ≈ 2·√n rounded to a power of two."""
    if n <= exact_max:
        return "Flat"
    nlist = 2 ** round(math.log2(2 * math.sqrt(n)))
    return f"IVF{max(1, min(nlist, 65536, n // 16))},Flat"


@dataclass
class LevelIndex:
    """One FAISS index (ids as described in the package docstring) and how it was built."""

    level: Level
    dim: int
    index: Any  # faiss.Index
    factory: str
    kind: Literal["exact", "approximate"]
    params: dict[str, int] = field(default_factory=dict)
    recall: float | None = None
    trained_size: int = 0
    build_seconds: float = 0.0
    tombstones: int = 0
    mapped: bool = False  # the FAISS data is a read-only map of ``source``
    source: Path | None = field(default=None, repr=False)  # a file equal to the index
    _origin: _Origin | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        level: Level,
        vectors: np.ndarray,
        ids: np.ndarray,
        *,
        factory: str = "auto",
        exact_max: int = 10_000,
        recall_target: float = 0.95,
        seed: int = 0,
    ) -> LevelIndex:
        """Index unit ``vectors`` under ``ids``: train (approximate types), add, then tune
        the search parameter on held-out vectors until recall@10 ≥ ``recall_target``."""
        t0 = time.perf_counter()
        n, dim = vectors.shape if vectors.ndim == 2 else (0, 0)
        spec = choose_factory(n, exact_max=exact_max) if factory == "auto" else factory
        index = _faiss_index(dim, spec)
        if not index.is_trained and n < max(1, int(getattr(_ivf(index), "nlist", 1))):
            log.info("%d vectors are too few to train %s; exact search until rebuilt", n, spec)
            spec = "Flat"
            index = _faiss_index(dim, spec)
        approximate = spec.removeprefix("IDMap2,").removeprefix("IDMap,") != "Flat"
        rng = np.random.default_rng(seed)
        order = rng.permutation(n)
        held = order[: min(_HELD_OUT, n // 10)] if approximate else order[:0]
        if not index.is_trained:
            ivf = _ivf(index)
            train = order[len(held) : len(held) + _train_size(ivf, n)]
            if ivf is not None and faiss.get_num_gpus() > 0:  # pragma: no cover - no GPU here
                ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim))
            index.train(vectors[np.sort(train)])
        if n:
            index.add_with_ids(vectors, ids)
        out = cls(
            level,
            dim,
            index,
            spec,
            "approximate" if approximate else "exact",
            trained_size=n,
        )
        if approximate and len(held):
            out._tune(vectors, ids, held, recall_target)
        out.build_seconds = time.perf_counter() - t0
        return out

    def _tune(self, vectors: np.ndarray, ids: np.ndarray, held: np.ndarray, target: float) -> None:
        """Smallest nprobe / efSearch whose recall@10 on held-out vectors reaches ``target``."""
        queries = vectors[held]
        exact = faiss.IndexFlatIP(self.dim)
        exact.add(vectors)
        _, truth = exact.search(queries, _RECALL_K + 1)
        truth = ids[truth]
        ivf = _ivf(self.index)
        grid: list[tuple[str, int]] = [("", 0)]
        if ivf is not None:
            nlist = int(ivf.nlist)
            grid = [("nprobe", g) for g in _NPROBES if g < nlist] + [("nprobe", nlist)]
        elif _hnsw(self.index) is not None:
            grid = [("efSearch", g) for g in _EFSEARCH]
        for name, value in grid:
            if name:
                self.params = {name: value}
            _, got = self.index.search(queries, _RECALL_K + 1, params=self._search_params(None))
            hits = [
                len(set(g[g != own][:_RECALL_K]) & set(t[t != own][:_RECALL_K])) / _RECALL_K
                for g, t, own in zip(got, truth, ids[held], strict=True)
            ]
            self.recall = float(np.mean(hits))
            if self.recall >= target:
                break

    def _search_params(self, sel: Any, k: int = 0) -> Any:
        if _ivf(self.index) is not None:
            p = faiss.SearchParametersIVF()
            p.nprobe = self.params.get("nprobe", 1)
        elif _hnsw(self.index) is not None:
            p = faiss.SearchParametersHNSW()
            p.efSearch = max(self.params.get("efSearch", 16), k)
        else:
            p = faiss.SearchParameters()
        if sel is not None:
            p.sel = sel
        return p

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        if len(ids):
            self._changing()
            self.index.add_with_ids(vectors, ids)

    def remove(self, ids: Sequence[int] | range) -> None:
        """Drop ids where FAISS can (flat, IVF); elsewhere (HNSW) they stay as tombstones,
        never returned because the search bitmap excludes them."""
        arr = np.asarray(list(ids), dtype=np.int64)
        if not len(arr):
            return
        self._changing()
        try:
            self.index.remove_ids(arr)
        except RuntimeError:
            self.tombstones += len(arr)

    def search(
        self, queries: np.ndarray, k: int, bits: np.ndarray, nbits: int
    ) -> tuple[np.ndarray, np.ndarray]:
        sel = faiss.IDSelectorBitmap(nbits, faiss.swig_ptr(bits))
        d, i = self.index.search(queries, k, params=self._search_params(sel, k))
        return d, i

    def reconstruct(self, ids: Sequence[int]) -> np.ndarray:
        return np.asarray(self.index.reconstruct_batch(np.asarray(ids, dtype=np.int64)))

    # -- files --
    @classmethod
    def read(
        cls,
        path: Path,
        level: Level,
        dim: int,
        info: Mapping[str, Any],
        *,
        fd: int | None = None,
        mmap: bool = True,
    ) -> LevelIndex:
        """The index in file ``path`` (memory-mapped where FAISS can, unless ``mmap`` is
        false), with the build metadata ``info`` that :meth:`info` gave when it was saved.
        ``fd``, a descriptor of the file (taken over), reads it even once it is deleted."""
        origin = _Origin(path, fd)
        where, index = origin.path, None
        if mmap:
            try:
                index = faiss.read_index(where, faiss.IO_FLAG_MMAP)
            except RuntimeError:  # a type FAISS cannot map: read into memory
                log.info("%s cannot be memory-mapped; reading it into memory", path)
        mapped = index is not None
        if index is None:
            index = faiss.read_index(where)
        ondisk = _ondisk_lists(index)
        if ondisk is not None:
            ondisk.prefetch_nthread = 0  # pages come from the map; no threads per search
        return cls(
            level=level,
            dim=dim,
            index=index,
            factory=info["factory"],
            kind=info["kind"],
            params=dict(info["params"]),
            recall=info["recall_at_10"],
            trained_size=int(info["trained_size"]),
            build_seconds=float(info["build_seconds"]),
            tombstones=int(info["tombstones"]),
            mapped=mapped,
            source=path,
            _origin=origin,
        )

    def write(self, path: Path) -> None:
        """Write the index to the new file ``path``: a hard link to (or a copy of) the file
        it is known to equal, else FAISS's serialisation."""
        if self._origin is not None:
            try:  # version files are never changed and their names never reused
                os.link(self._origin.name, path)
                return
            except OSError:  # gone, or another file system: copy what the descriptor holds
                self._origin.copy_to(path)
                return
        faiss.write_index(self.index, str(path))

    def saved_as(self, path: Path) -> None:
        """Record that the (unchanged) index now equals file ``path``."""
        self._release()
        self.source, self._origin = path, _Origin(path)

    def _changing(self) -> None:
        """Before a change: copy a mapped index into memory, forget the file it equalled."""
        if self.mapped:
            self.index = _in_memory(self.index)
            self.mapped = False
        self._release()

    def _release(self) -> None:
        if self._origin is not None:
            self._origin.close()
        self.source, self._origin = None, None

    def info(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "factory": self.factory,
            "kind": self.kind,
            "vectors": self.ntotal,
            "dim": self.dim,
            "params": dict(self.params),
            "recall_at_10": self.recall,
            "trained_size": self.trained_size,
            "build_seconds": round(self.build_seconds, 3),
            "tombstones": self.tombstones,
            "memory_bytes": _memory(self.index),
            "mapped": self.mapped,
            "device": "cpu",
        }


class _Origin:
    """An open descriptor of the file an index was read from or saved to: the file stays
    readable (to copy it) when another process deletes its version folder."""

    def __init__(self, path: Path, fd: int | None = None) -> None:
        self.fd = os.open(path, os.O_RDONLY) if fd is None else fd
        self._closer = weakref.finalize(self, os.close, self.fd)
        proc = Path(f"/proc/self/fd/{self.fd}")
        self.path = str(proc) if proc.exists() else str(path)  # immune to renames on Linux
        self.name = path

    def copy_to(self, dest: Path) -> None:
        with open(dest, "xb") as out, os.fdopen(os.dup(self.fd), "rb") as src:
            src.seek(0)
            shutil.copyfileobj(src, out, 1 << 24)

    def close(self) -> None:
        self._closer()


def _faiss_index(dim: int, spec: str) -> Any:
    try:
        if spec.startswith(("IVF", "IDMap")):
            index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.index_factory(dim, f"IDMap2,{spec}", faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise SearchIndexError(
            f"FAISS cannot build index type {spec!r} ({str(exc).splitlines()[-1]}); expected a "
            "factory string such as 'Flat', 'IVF1024,Flat', 'HNSW32' or 'IVF1024,PQ32'."
        ) from exc
    ivf = _ivf(index)
    if ivf is not None:  # so vectors can be read back by id and removed
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index


def _ivf(index: Any) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _ondisk_lists(index: Any) -> Any:
    """The memory-mapped inverted lists of an IVF index read with ``IO_FLAG_MMAP``, if any."""
    ivf = _ivf(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def _in_memory(index: Any) -> Any:
    """``index`` with its data in memory: mapped IVF lists copied into array lists (FAISS
    cannot change or clone mapped lists), other mapped types cloned."""
    ondisk = _ondisk_lists(index)
    if ondisk is None:
        return faiss.clone_index(index)
    lists = faiss.ArrayInvertedLists(ondisk.nlist, ondisk.code_size)
    for k in range(ondisk.nlist):
        n = ondisk.list_size(k)
        if n:
            lists.add_entries(k, n, ondisk.get_ids(k), ondisk.get_codes(k))
    _ivf(index).replace_invlists(lists, True)
    lists.this.disown()  # the index owns (and frees) them now
    return index


def _hnsw(index: Any) -> Any:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def _train_size(ivf: Any, n: int) -> int:
    k = int(ivf.nlist) if ivf is not None else 256
    return min(n, max(64 * k, 10_000))


def _memory(index: Any) -> int:
    ivf = _ivf(index)
    if ivf is not None:
        codes = int(ivf.ntotal) * int(ivf.code_size)
        return codes + int(ivf.ntotal) * 8 + int(ivf.nlist) * int(ivf.d) * 4
    return int(index.ntotal) * int(index.d) * 4 + int(index.ntotal) * 16
