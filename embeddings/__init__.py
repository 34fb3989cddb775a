"""radcache.embeddings: DICOM/NIfTI volumes → frozen DINOv2 → embeddings in a Zarr cache.

The stages, each a module with one entry point:

* :func:`scan` (ingest) — files → :class:`Volume` candidates
* :func:`prepare` (preprocess) — volume + :class:`Recipe` → model-ready tensors
* :func:`load_encoder` (encode) — model registry → :class:`Encoder`
* :func:`open_store` (store) — the Zarr cache
* :func:`open_index` (index) — FAISS indexes over the store, one per space and level
* :class:`Searcher` (search) — similar cases and few-shot classification
* :class:`Pipeline` — composes them, skipping cached volumes
* :func:`get_preset` (presets) — the papers' protocols by name: a recipe and a probe

Names load on first use (PEP 562), so ``radcache.embeddings.errors`` or ``.settings`` can be
imported without pulling in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_names

if TYPE_CHECKING:
    from ._version import __version__
    from .encode import Encoder, SliceEmbeddings, load_encoder
    from .errors import RadcacheError
    from .index import Filters, IndexSet, open_index
    from .ingest import Candidate, ScanResult, load_volumes, scan
    from .models import DEFAULT_MODEL, REGISTRY, ModelCfg
    from .pipeline import EmbedReport, Pipeline, SeriesResult
    from .preprocess import Prepared, prepare
    from .presets import PRESETS, Preset, get_preset
    from .pseudonyms import InputRefs, Pseudonymizer
    from .recipe import Recipe, load_recipe
    from .search import Query, Searcher
    from .settings import Settings, get_settings
    from .store import EmbeddingStore, EntryInfo, open_store
    from .volume import Geometry, Volume, VolumeMeta

_WHERE = {
    "Encoder": "encode",
    "SliceEmbeddings": "encode",
    "load_encoder": "encode",
    "RadcacheError": "errors",
    "Filters": "index",
    "IndexSet": "index",
    "open_index": "index",
    "Query": "search",
    "Searcher": "search",
    "Candidate": "ingest",
    "ScanResult": "ingest",
    "load_volumes": "ingest",
    "scan": "ingest",
    "InputRefs": "pseudonyms",
    "Pseudonymizer": "pseudonyms",
    "DEFAULT_MODEL": "models",
    "REGISTRY": "models",
    "ModelCfg": "models",
    "EmbedReport": "pipeline",
    "Pipeline": "pipeline",
    "SeriesResult": "pipeline",
    "__version__": "_version",
    "Prepared": "preprocess",
    "prepare": "preprocess",
    "PRESETS": "presets",
    "Preset": "presets",
    "get_preset": "presets",
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "Settings": "settings",
    "get_settings": "settings",
    "EmbeddingStore": "store",
    "EntryInfo": "store",
    "open_store": "store",
    "Geometry": "volume",
    "Volume": "volume",
    "VolumeMeta": "volume",
}

__all__ = [
    "DEFAULT_MODEL",
    "PRESETS",
    "REGISTRY",
    "Candidate",
    "EmbedReport",
    "EmbeddingStore",
    "Encoder",
    "EntryInfo",
    "Filters",
    "Geometry",
    "IndexSet",
    "InputRefs",
    "ModelCfg",
    "Pipeline",
    "Prepared",
    "Preset",
    "Pseudonymizer",
    "Query",
    "RadcacheError",
    "Recipe",
    "ScanResult",
    "Searcher",
    "SeriesResult",
    "Settings",
    "SliceEmbeddings",
    "Volume",
    "VolumeMeta",
    "__version__",
    "get_preset",
    "get_settings",
    "load_encoder",
    "load_recipe",
    "load_volumes",
    "open_index",
    "open_store",
    "prepare",
    "scan",
]

__getattr__, __dir__ = lazy_names(__name__, _WHERE, __all__)
