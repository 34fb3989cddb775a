"""Model registry and loading (DINOv2 S/B/L/g, with registers, RAD-DINO, local checkpoints).

Layout: ``_registry`` (the entries), ``_config`` (checkpoint configs), ``_loader`` (loading,
and the hooks other architectures register with), ``mmdinov2`` (MM-DINOv2, which registers
itself; its model in ``_mm_model``, its checkpoints in ``_mm_checkpoint``).
"""

from typing import TYPE_CHECKING, Any

from ._loader import build_random, plain_cfg, weights_identity
from ._registry import DEFAULT_MODEL, REGISTRY, ModelCfg, get_cfg

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "ModelCfg",
    "build_random",
    "get_cfg",
    "plain_cfg",
    "weights_identity",
]

# Names that need torch load on first use (PEP 562), so the registry above stays importable
# without torch. ``load_backbone`` and ``resolve_backbone`` are among them: reaching them
# imports ``mmdinov2`` first, so MM-DINOv2's loaders are registered before anything loads.
if TYPE_CHECKING:
    from ._loader import load_backbone, resolve_backbone
    from .mmdinov2 import (
        SEQUENCES,
        MMDinov2,
        MMOutput,
        convert,
        load_converted,
        load_training_checkpoint,
        save_converted,
        save_training_checkpoint,
    )

__all__ += [
    "SEQUENCES",
    "MMDinov2",
    "MMOutput",
    "convert",
    "load_backbone",
    "load_converted",
    "load_training_checkpoint",
    "resolve_backbone",
    "save_converted",
    "save_training_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name in __all__:  # only the lazy names reach here
        from . import _loader, mmdinov2

        loader = name in ("load_backbone", "resolve_backbone")
        return getattr(_loader if loader else mmdinov2, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
