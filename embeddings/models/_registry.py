"""The model registry: one frozen :class:`ModelCfg` per supported encoder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import UnknownModelError

__all__ = ["DEFAULT_MODEL", "REGISTRY", "ModelCfg", "get_cfg"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_PAPER = "Oquab et al. 2023, DINOv2: Learning Robust Visual Features without Supervision"
REG_PAPER = "Darcet et al. 2024, Vision Transformers Need Registers"


@dataclass(frozen=True)
class ModelCfg:
    """Everything radcache needs to know about an encoder, recorded with every embedding."""

    name: str
    hf_id: str | None
    arch: Literal["dinov2", "dinov2-reg", "mm-dinov2"]
    dim: int
    patch_size: int
    image_size: int  # native input resolution (square), a multiple of ``patch_size``
    num_registers: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    license: str = "Apache-2.0"
    paper: str = DINOV2_PAPER
    random_weights: bool = False  # True only for the built-in test models
    depth: int = 12
    heads: int = 6
    mlp_dim: int = 1536
    note: str = ""
    #: MM-DINOv2: the sequence vocabulary, the registry name of the DINOv2 it is built on,
    #: and whether its sequence embeddings are seeded placeholders (not trained).
    sequences: tuple[str, ...] = ()
    base: str | None = None
    untrained_sequences: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def label(self) -> str:
        """Name as shown to people; random-weight models say so."""
        if self.random_weights:
            return f"{self.name} (RANDOM WEIGHTS, tests only)"
        if self.untrained_sequences:
            return f"{self.name} (UNTRAINED sequence embeddings)"
        return self.name

    @property
    def multi_sequence(self) -> bool:
        return self.arch == "mm-dinov2"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _dinov2(name: str, size: str, dim: int, depth: int, heads: int, mlp: int) -> ModelCfg:
    return ModelCfg(
        name=name,
        hf_id=f"facebook/dinov2-{size}",
        arch="dinov2",
        dim=dim,
        patch_size=14,
        image_size=224,
        depth=depth,
        heads=heads,
        mlp_dim=mlp,
    )


def _reg(base: ModelCfg, size: str) -> ModelCfg:
    return dataclasses.replace(
        base,
        name=f"{base.name}-reg",
        hf_id=f"facebook/dinov2-with-registers-{size}",
        arch="dinov2-reg",
        num_registers=4,
        paper=REG_PAPER,
    )


_SIZES = {
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "giant": (1536, 40, 24, 6144),
}

REGISTRY: dict[str, ModelCfg] = {}
for _size, (_dim, _depth, _heads, _mlp) in _SIZES.items():
    _cfg = _dinov2(f"dinov2-{_size}", _size, _dim, _depth, _heads, _mlp)
    REGISTRY[_cfg.name] = _cfg
    REGISTRY[f"{_cfg.name}-reg"] = _reg(_cfg, _size)

REGISTRY["rad-dino"] = ModelCfg(
    name="rad-dino",
    hf_id="microsoft/rad-dino",
    arch="dinov2",
    dim=768,
    patch_size=14,
    image_size=518,
    mean=(0.5307, 0.5307, 0.5307),
    std=(0.2583, 0.2583, 0.2583),
    license="MIT (research use only, not for clinical practice)",
    paper="Pérez-García et al. 2025, Exploring scalable medical image encoders beyond text "
    "supervision",
    depth=12,
    heads=12,
    mlp_dim=3072,
    note="trained on chest X-rays",
)

REGISTRY["dinov2-tiny-random"] = ModelCfg(
    name="dinov2-tiny-random",
    hf_id=None,
    arch="dinov2",
    dim=64,
    patch_size=14,
    image_size=112,
    random_weights=True,
    depth=2,
    heads=4,
    mlp_dim=128,
    license="n/a",
    paper="n/a",
    note="deterministic random weights built in code; for tests and smoke runs only",
)
REGISTRY["dinov2-small-random"] = dataclasses.replace(
    REGISTRY["dinov2-small"],
    name="dinov2-small-random",
    hf_id=None,
    random_weights=True,
    license="n/a",
    paper="n/a",
    note="ViT-S/14 geometry with deterministic random weights; for benchmarks only",
)

#: MM-DINOv2 (Scholz et al. 2025): the paper's intensity statistics.
MM_MEAN, MM_STD = (0.45, 0.45, 0.45), (0.22, 0.22, 0.22)
MM_SEQUENCES = ("t1", "t1c", "t2", "flair")
MM_PAPER = (
    "Scholz et al. 2025, MM-DINOv2: Adapting Foundation Models for Multi-Modal Medical "
    "Image Analysis"
)
REGISTRY["mm-dinov2-tiny-random"] = dataclasses.replace(
    REGISTRY["dinov2-tiny-random"],
    name="mm-dinov2-tiny-random",
    arch="mm-dinov2",
    mean=MM_MEAN,
    std=MM_STD,
    sequences=MM_SEQUENCES,
    base="dinov2-tiny-random",
    paper=MM_PAPER,
    note="MM-DINOv2 on the tiny random DINOv2 with seeded sequence embeddings; tests only",
)
for _size in ("small", "base", "large", "giant"):
    REGISTRY[f"mm-dinov2-{_size}-untrained"] = dataclasses.replace(
        REGISTRY[f"dinov2-{_size}"],
        name=f"mm-dinov2-{_size}-untrained",
        arch="mm-dinov2",
        mean=MM_MEAN,
        std=MM_STD,
        sequences=MM_SEQUENCES,
        base=f"dinov2-{_size}",
        untrained_sequences=True,
        paper=MM_PAPER,
        note=f"MM-DINOv2 built on dinov2-{_size} with seeded, UNTRAINED sequence embeddings "
        "(for users without MM-DINOv2 weights; pass a converted checkpoint directory for the "
        "real model)",
    )

DEFAULT_MODEL = "dinov2-base"


def get_cfg(name: str) -> ModelCfg:
    """Registry entry for ``name``; raises :class:`UnknownModelError` listing what exists."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise UnknownModelError(
            f"unknown model {name!r}; expected one of: {known}, or a directory holding a "
            "Hugging Face checkpoint (config.json + model.safetensors)."
        ) from None
