"""radcache.embeddings: DICOM/NIfTI volumes → frozen DINOv2 → embeddings in a Zarr cache.

The stages, each a module with one entry point:

* :func:`scan` (ingest) — files → :class:`Volume` candidates
* :func:`prepare` (preprocess) — volume + :class:`Recipe` → model-ready tensors
* :func:`load_encoder` (encode) — model registry → :class:`Encoder`
* :func:`open_store` (store) — the Zarr cache
* :class:`Pipeline` — composes them, skipping cached volumes
"""

from .encode import Encoder, SliceEmbeddings, load_encoder
from .errors import RadcacheError
from .ingest import Candidate, ScanResult, load_volumes, scan
from .keys import Pseudonymizer
from .models import DEFAULT_MODEL, REGISTRY, ModelCfg
from .pipeline import EmbedReport, Pipeline, SeriesResult, __version__
from .preprocess import Prepared, prepare
from .recipe import Recipe, load_recipe
from .settings import Settings, get_settings
from .store import EmbeddingStore, EntryInfo, open_store
from .volume import Geometry, Volume, VolumeMeta

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "Candidate",
    "EmbedReport",
    "EmbeddingStore",
    "Encoder",
    "EntryInfo",
    "Geometry",
    "ModelCfg",
    "Pipeline",
    "Prepared",
    "Pseudonymizer",
    "RadcacheError",
    "Recipe",
    "ScanResult",
    "SeriesResult",
    "Settings",
    "SliceEmbeddings",
    "Volume",
    "VolumeMeta",
    "__version__",
    "get_settings",
    "load_encoder",
    "load_recipe",
    "load_volumes",
    "open_store",
    "prepare",
    "scan",
]
