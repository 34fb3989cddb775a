"""Index: FAISS nearest-neighbour indexes over the store's tables.

Entry point :func:`open_index` → :class:`IndexSet`, one :class:`SpaceIndex` per
(model weights, recipe) space, each with two FAISS indexes (levels): ``series`` (the
pooled vector of each entry) and ``slice`` (the CLS token of each embedded slice).
Vectors are L2-normalised, so inner product is cosine similarity.

Ids are stable: an entry gets the next *ordinal* when it joins the index, and its slices
the next run of *slice ids*. Deleted entries leave holes (tombstones) that a rebuild
compacts. Every search runs with a FAISS ``IDSelectorBitmap`` of the ids it may return —
live, matching the filters, not excluded — so filters and exclusions are applied inside
the search, and nothing deleted can come back.

Below ``exact_max`` vectors a level is exact (``Flat``); above it an IVF index trained on a
sample, whose ``nprobe`` is tuned at build time until recall@10 against exact search on
held-out vectors reaches ``recall_target``; the measured recall is kept in the metadata.
An index is saved as one folder per space next to the store (each save a new version
folder of its own, then a ``CURRENT`` pointer atomically replaced under a file lock; old
versions are removed only once no reader can need them), loaded with its FAISS files
memory-mapped, and brought up to date from the store's tables by :meth:`IndexSet.refresh`.
Rebuilds run beside the serving index and swap in when done.

Rooms (each imports only those above it):

* ``_vectors`` — :data:`Level`, :data:`LEVELS`, :func:`normalise`
* ``catalog`` — :class:`Record`, :class:`Filters`, :class:`Catalog` (ids, lookups, bitmaps)
* ``catalog_arrays`` — the catalog as arrays (``catalog.npz``), columnar, labels parsed lazily
* ``level`` — :class:`LevelIndex` (one FAISS index: build, tune, search), :func:`choose_factory`
* ``folders`` — version folders behind ``CURRENT``: a lock for the pointer, safe cleanup
* ``space`` — :class:`SpaceIndex` (catalog + both levels, save/load), :class:`Hit`
* ``indexset`` — :class:`IndexSet` (every space of a store, refresh), :func:`open_index`,
  :func:`default_index_dir`
"""

from __future__ import annotations

from ._vectors import LEVELS, Level, normalise
from .catalog import Catalog, Filters, Record
from .indexset import IndexSet, default_index_dir, open_index
from .level import LevelIndex, choose_factory
from .space import INDEX_FORMAT, Hit, SpaceIndex

__all__ = [
    "INDEX_FORMAT",
    "LEVELS",
    "Catalog",
    "Filters",
    "Hit",
    "IndexSet",
    "Level",
    "LevelIndex",
    "Record",
    "SpaceIndex",
    "choose_factory",
    "default_index_dir",
    "normalise",
    "open_index",
]
