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
      [<data>/]                         the rows (in the subgroup ``data`` names, once compacted)
        keys   (N, 2) uint64   entry keys (128-bit)
        pooled (N, D) float32  series vectors
        offsets (N+1,) int64   rows of ``cls`` belonging to entry i: offsets[i]:offsets[i+1]
        cls    (S, D) float32  all slice CLS tokens, concatenated
        deleted (M,) int64     tombstones: rows of deleted entries

An entry becomes visible only when its metadata, written last, says ``complete``; a table
row only when the table's ``count`` (written last) covers it, and stops being live when its
tombstone is counted. A crash mid-write leaves nothing visible, and the next write of the
same key replaces the debris. Tables are never rewritten in place: compaction writes the
live rows beside the old ones and swaps them in with one metadata write.

The rooms:

* :mod:`.embedding_store` — :class:`EmbeddingStore` and :func:`open_store`
* :mod:`.entries` — :class:`EntryInfo`, :class:`EntryWriter` (``entries/``)
* :mod:`.tables` — :class:`Table`, :func:`space_id`, appending, tombstoning and reading rows
  (``tables/``)
* :mod:`.compaction` — tables rewritten without their tombstoned rows, beside the old ones
* :mod:`.integrity` — what a stopped process leaves disagreeing, found and repaired
  (``radcache check``)
* :mod:`.files` — re-sent file digests and volume records (``files/``, ``volumes/``)
* :mod:`.backend` — :class:`LocalBackend` (directory) and :class:`ObjectBackend` (fsspec
  URL), each declaring what it supports
* :mod:`.locks` — Redis locks that let several processes write one object store

Names load on first use (PEP 562), so :mod:`.locks` can be imported without Zarr.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

if TYPE_CHECKING:
    from ._common import _key_words as _key_words
    from ._common import _words_key as _words_key
    from .backend import Backend as Backend
    from .backend import LocalBackend as LocalBackend
    from .backend import ObjectBackend as ObjectBackend
    from .embedding_store import STORE_FORMAT, EmbeddingStore, open_store
    from .entries import ARRAY_KINDS, EntryInfo, EntryWriter
    from .entries import DIMS as DIMS
    from .entries import SEQUENCE_PATCH_DIMS as SEQUENCE_PATCH_DIMS
    from .entries import Kind as Kind
    from .files import REF_FIELDS as REF_FIELDS
    from .files import SHARED_FILE as SHARED_FILE
    from .files import file_group as file_group
    from .locks import Locks as Locks
    from .tables import Table
    from .tables import space_id as space_id

_WHERE = {
    "_key_words": "_common",
    "_words_key": "_common",
    "Backend": "backend",
    "LocalBackend": "backend",
    "ObjectBackend": "backend",
    "STORE_FORMAT": "embedding_store",
    "EmbeddingStore": "embedding_store",
    "open_store": "embedding_store",
    "ARRAY_KINDS": "entries",
    "DIMS": "entries",
    "SEQUENCE_PATCH_DIMS": "entries",
    "EntryInfo": "entries",
    "EntryWriter": "entries",
    "Kind": "entries",
    "REF_FIELDS": "files",
    "SHARED_FILE": "files",
    "file_group": "files",
    "Locks": "locks",
    "Table": "tables",
    "space_id": "tables",
}

__all__ = [
    "ARRAY_KINDS",
    "STORE_FORMAT",
    "EmbeddingStore",
    "EntryInfo",
    "EntryWriter",
    "Table",
    "open_store",
]

__getattr__, __dir__ = lazy_names(__name__, _WHERE, __all__)
