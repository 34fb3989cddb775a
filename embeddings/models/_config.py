"""Checkpoint configs: ``config.json`` and preprocessor statistics → :class:`ModelCfg`, and back.

Shared by the loader and by model files; imports only the registry (no torch at import time).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ._registry import IMAGENET_MEAN, IMAGENET_STD, ModelCfg

__all__ = ["is_mm_checkpoint", "read_config"]

_SUPPORTED_TYPES = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2-reg"}


def _hf_config(cfg: ModelCfg) -> Any:
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    kwargs: dict[str, Any] = {
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.heads,
        "mlp_ratio": cfg.mlp_dim // cfg.dim,
        "patch_size": cfg.patch_size,
        "image_size": cfg.image_size,
        "layerscale_value": 1.0,
    }
    if cfg.arch == "dinov2-reg":
        return Dinov2WithRegistersConfig(num_register_tokens=cfg.num_registers, **kwargs)
    return Dinov2Config(**kwargs)


def _processor_stats(path: Path) -> dict[str, Any]:
    """Mean, std and input size from a checkpoint's ``preprocessor_config.json``, if any."""
    p = path / "preprocessor_config.json"
    if not p.is_file():
        return {}
    try:
        pc = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, Any] = {}
    if "image_mean" in pc and "image_std" in pc:
        out["mean"] = tuple(float(v) for v in pc["image_mean"])
        out["std"] = tuple(float(v) for v in pc["image_std"])
    crop = pc.get("crop_size")
    if isinstance(crop, dict) and "height" in crop:
        out["image_size"] = int(crop["height"])
    elif isinstance(crop, int):
        out["image_size"] = crop
    return out


def read_config(path: Path, expected: str) -> dict[str, Any]:
    """``path/config.json``, or a :class:`ModelError` saying what ``expected`` was."""
    try:
        config: dict[str, Any] = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{path} has no readable config.json ({exc}); expected {expected}."
        ) from exc
    return config


def is_mm_checkpoint(path: Path) -> bool:
    """Whether ``path`` is an MM-DINOv2 directory (its ``config.json`` has ``mm_dinov2``)."""
    try:
        return "mm_dinov2" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _cfg_from_checkpoint(path: Path, base: ModelCfg | None) -> ModelCfg:
    config = read_config(
        path, "a Hugging Face checkpoint directory (config.json + model.safetensors)"
    )
    model_type = config.get("model_type")
    if model_type not in _SUPPORTED_TYPES:
        raise ModelError(
            f"{path} holds a {model_type!r} model; expected a DINOv2-family checkpoint "
            f"(model_type one of {sorted(_SUPPORTED_TYPES)})."
        )
    stats = _processor_stats(path)
    patch = int(config.get("patch_size", 14))
    size = int(stats.get("image_size", base.image_size if base else 224))
    size -= size % patch
    fields = {
        "name": base.name if base else f"local:{path.name}",
        "hf_id": base.hf_id if base else None,
        "arch": _SUPPORTED_TYPES[model_type],
        "dim": int(config["hidden_size"]),
        "patch_size": patch,
        "image_size": size,
        "num_registers": int(config.get("num_register_tokens", 0)),
        "mean": stats.get("mean", base.mean if base else IMAGENET_MEAN),
        "std": stats.get("std", base.std if base else IMAGENET_STD),
        "depth": int(config.get("num_hidden_layers", 12)),
        "heads": int(config.get("num_attention_heads", 12)),
        "mlp_dim": int(config.get("mlp_ratio", 4) * config["hidden_size"]),
    }
    if base is None:
        return ModelCfg(license="see checkpoint", paper="see checkpoint", **fields)
    return dataclasses.replace(base, **fields)
