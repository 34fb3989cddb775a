"""Load a DINOv2-family backbone: registry name, local checkpoint, HF cache, or download.

Loading is strict: a checkpoint whose weights do not cover the architecture raises
instead of leaving layers randomly initialised (which would give plausible-looking,
wrong embeddings).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch

from ..errors import ModelError, ModelUnavailableError
from ._registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MM_MEAN,
    MM_PAPER,
    MM_STD,
    REGISTRY,
    ModelCfg,
    get_cfg,
)

__all__ = ["build_random", "load_backbone"]

log = logging.getLogger(__name__)
_SUPPORTED_TYPES = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2-reg"}
RANDOM_SEED = 20231101


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


def build_random(cfg: ModelCfg) -> torch.nn.Module:
    """The labelled random-weight model: same seed, same weights, on every run."""
    import torch
    from transformers import AutoModel

    config = _hf_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model: torch.nn.Module = AutoModel.from_config(config, attn_implementation="sdpa")
    return model


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


def _strict_load(path: Path) -> torch.nn.Module:
    import torch
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(
        str(path), attn_implementation="sdpa", output_loading_info=True, dtype=torch.float32
    )
    missing = [k for k in info.get("missing_keys", []) if "mask_token" not in k]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise ModelError(
            f"checkpoint {path} does not match its architecture: {len(missing)} missing and "
            f"{len(mismatched)} mismatched weight tensors (first: "
            f"{(missing or [str(m) for m in mismatched])[:3]}). Refusing to run with randomly "
            "initialised layers; use the checkpoint's original files."
        )
    if info.get("unexpected_keys"):
        log.info("ignoring %d unused tensors in %s", len(info["unexpected_keys"]), path)
    return cast(torch.nn.Module, model)


def _is_mm(path: Path) -> bool:
    try:
        return "mm_dinov2" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _mm_fields(cfg: ModelCfg) -> dict[str, Any]:
    """What an MM-DINOv2 entry changes in its base DINOv2's config."""
    keep = ("name", "arch", "mean", "std", "sequences", "base", "untrained_sequences")
    return {k: getattr(cfg, k) for k in (*keep, "paper", "note", "random_weights", "hf_id")}


def _load_mm_dir(path: Path) -> tuple[ModelCfg, torch.nn.Module]:
    """A directory written by ``radcache.embeddings.models.convert``."""
    from .mmdinov2 import load_converted

    mm = load_converted(path)
    base = _cfg_from_checkpoint(path, None)
    cfg = dataclasses.replace(
        base,
        name=path.name,
        arch="mm-dinov2",
        mean=MM_MEAN,
        std=MM_STD,
        sequences=tuple(mm.sequences),
        untrained_sequences=bool(mm.untrained),
        paper=MM_PAPER,
    )
    return cfg, mm


def _resolve_hub(hf_id: str, cache_dir: str | None, offline: bool) -> Path:
    """Local snapshot directory of ``hf_id``: from the HF cache, else downloaded."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors"]
    try:
        return Path(
            snapshot_download(
                hf_id, cache_dir=cache_dir, local_files_only=True, allow_patterns=patterns
            )
        )
    except Exception as cached_exc:
        if offline:
            raise _unavailable(
                hf_id,
                f"not in the local cache ({type(cached_exc).__name__}), "
                "and downloads are off (offline mode)",
            ) from cached_exc
    try:
        return Path(snapshot_download(hf_id, cache_dir=cache_dir, allow_patterns=patterns))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _unavailable(
            hf_id, f"not in the local cache and the download failed: {reason}"
        ) from exc


def _unavailable(hf_id: str, why: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"model weights for {hf_id!r} are not available: {why}. Either (a) download them where "
        f"there is internet (`hf download {hf_id}`) and copy the Hugging Face cache here "
        "(or set HF_HOME), or (b) pass --model /path/to/checkpoint, a directory with config.json "
        "and model.safetensors. For a smoke run without weights use --model dinov2-tiny-random "
        "(random weights, not for real use)."
    )


def load_backbone(
    spec: str, *, cache_dir: str | None = None, offline: bool | None = None
) -> tuple[ModelCfg, torch.nn.Module]:
    """Resolve ``spec`` (registry name or checkpoint directory) to its config and HF module."""
    if offline is None:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    path = Path(spec).expanduser()
    if spec not in REGISTRY and path.is_dir():
        if _is_mm(path):
            return _load_mm_dir(path)
        return _cfg_from_checkpoint(path, None), _strict_load(path)
    cfg = get_cfg(spec)
    if cfg.multi_sequence:
        assert cfg.base is not None
        base_cfg, backbone = load_backbone(cfg.base, cache_dir=cache_dir, offline=offline)
        from .mmdinov2 import MMDinov2

        mm = MMDinov2.from_backbone(backbone, cfg.sequences, seed=RANDOM_SEED)
        return dataclasses.replace(base_cfg, **_mm_fields(cfg)), mm
    if cfg.random_weights:
        return cfg, build_random(cfg)
    assert cfg.hf_id is not None
    local = _resolve_hub(cfg.hf_id, cache_dir, offline)
    return _cfg_from_checkpoint(local, cfg), _strict_load(local)
