"""MM-DINOv2: one frozen DINOv2 pass over several MRI sequences of a slice, missing ones masked.

Scholz et al., MICCAI 2025, "MM-DINOv2: Adapting Foundation Models for Multi-Modal Medical
Image Analysis". The model is in ``_mm_model``, its checkpoints in ``_mm_checkpoint``; this
module gathers the public names and registers MM-DINOv2 with the loader on import: registry
entries of arch ``mm-dinov2`` and directories written by :func:`convert`.

Entry points: :meth:`MMDinov2.from_backbone` (sequence embeddings untrained),
:func:`load_training_checkpoint` (a checkpoint written by the DINOv2 training code),
:func:`convert` and :func:`load_converted` (the Hugging Face-style directory radcache keeps).
radcache runs the model frozen; training is out of scope.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ._config import _cfg_from_checkpoint, is_mm_checkpoint
from ._loader import RANDOM_SEED, load_backbone, register_arch_loader, register_dir_loader
from ._mm_checkpoint import (
    CHECKPOINT_PREFIXES,
    CHECKPOINT_WRAPPERS,
    SEQUENCE_EMBEDDING,
    TRAINING_TO_HF,
    convert,
    load_converted,
    load_training_checkpoint,
    save_converted,
    save_training_checkpoint,
)
from ._mm_model import SEQUENCES, MMDinov2, MMOutput
from ._registry import MM_MEAN, MM_PAPER, MM_STD, ModelCfg

__all__ = [
    "CHECKPOINT_PREFIXES",
    "CHECKPOINT_WRAPPERS",
    "SEQUENCES",
    "SEQUENCE_EMBEDDING",
    "TRAINING_TO_HF",
    "MMDinov2",
    "MMOutput",
    "convert",
    "load_converted",
    "load_training_checkpoint",
    "save_converted",
    "save_training_checkpoint",
]


def _mm_fields(cfg: ModelCfg) -> dict[str, Any]:
    """What an MM-DINOv2 entry changes in its base DINOv2's config."""
    keep = ("name", "arch", "mean", "std", "sequences", "base", "untrained_sequences")
    return {k: getattr(cfg, k) for k in (*keep, "paper", "note", "random_weights", "hf_id")}


def _load_mm_dir(path: Path) -> tuple[ModelCfg, MMDinov2]:
    """A directory written by ``radcache.embeddings.models.convert``."""
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


def _load_mm_entry(
    cfg: ModelCfg, cache_dir: str | None, offline: bool
) -> tuple[ModelCfg, MMDinov2]:
    """A registry entry: its base DINOv2, loaded as usual, with seeded sequence embeddings."""
    assert cfg.base is not None
    base_cfg, backbone = load_backbone(cfg.base, cache_dir=cache_dir, offline=offline)
    mm = MMDinov2.from_backbone(backbone, cfg.sequences, seed=RANDOM_SEED)
    return dataclasses.replace(base_cfg, **_mm_fields(cfg)), mm


register_dir_loader(is_mm_checkpoint, _load_mm_dir)
register_arch_loader("mm-dinov2", _load_mm_entry)
