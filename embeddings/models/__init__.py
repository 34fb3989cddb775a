"""Model registry and loading (DINOv2 S/B/L/g, with registers, RAD-DINO, local checkpoints)."""

from ._loader import build_random, load_backbone
from ._registry import DEFAULT_MODEL, REGISTRY, ModelCfg, get_cfg

__all__ = ["DEFAULT_MODEL", "REGISTRY", "ModelCfg", "build_random", "get_cfg", "load_backbone"]
