"""Model registry and loading (DINOv2 S/B/L/g, with registers, RAD-DINO, local checkpoints)."""

from ._loader import build_random, load_backbone
from ._registry import DEFAULT_MODEL, REGISTRY, ModelCfg, get_cfg

__all__ = ["DEFAULT_MODEL", "REGISTRY", "ModelCfg", "build_random", "get_cfg", "load_backbone"]

# MM-DINOv2 (several MRI sequences per pass) needs torch: its names load on first use
# (PEP 562), so the registry above stays importable without torch.
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    "load_converted",
    "load_training_checkpoint",
    "save_converted",
    "save_training_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name in __all__:  # only the MM-DINOv2 names reach here
        from . import mmdinov2

        return getattr(mmdinov2, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
