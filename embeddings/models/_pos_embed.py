"""DINOv2's positional embedding, interpolated as the official release computes it.

Reference: ``DinoVisionTransformer.interpolate_pos_encoding`` in
dinov2/models/vision_transformer.py of github.com/facebookresearch/dinov2, with the
per-model settings of its dinov2/hub/backbones.py: the plain models resample by scale factor
with a 0.1 offset and no antialiasing; the ``_reg`` models by output size (no offset) with
antialiasing. The papers' code built on it does the same as the plain models
(MohammedSB/DINOv2ForRadiology and daniel-scholz/mm-dinov2, each in
dinov2/models/vision_transformer.py).

transformers' ``Dinov2Embeddings`` resamples by output size without antialiasing, which
differs from the plain models' whenever the grid is resampled (every forward at 224 px of a
checkpoint with a 37×37 grid); ``Dinov2WithRegistersEmbeddings`` already matches the
``_reg`` models'. :func:`with_official_interpolation` gives a built model the official
method through a subclass of its embeddings module; nothing global changes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersEmbeddings,
)

from ..errors import ModelError

if TYPE_CHECKING:
    from ._registry import ModelCfg

__all__ = [
    "OFFICIAL_SETTINGS",
    "OUTPUT_VERSION",
    "interpolate_pos_embed",
    "uses_official_interpolation",
    "with_official_interpolation",
]

#: ``(interpolate_offset, interpolate_antialias)`` per arch, as dinov2/hub/backbones.py
#: builds the released models (``dinov2_vit*14`` and ``dinov2_vit*14_reg``).
OFFICIAL_SETTINGS: dict[str, tuple[float, bool]] = {
    "dinov2": (0.1, False),
    "dinov2-reg": (0.0, True),
}
#: ``output_version`` of the plain models once they interpolate as the release does (their
#: outputs changed for the same weights); the ``_reg`` models' outputs did not change.
OUTPUT_VERSION = 1
#: Publisher of the released weights on the Hugging Face hub.
_RELEASE_PREFIX = "facebook/dinov2"


def interpolate_pos_embed(
    stored: torch.Tensor,
    height: int,
    width: int,
    patch_size: int,
    *,
    offset: float,
    antialias: bool,
) -> torch.Tensor:
    """The positional embedding ``(1, 1 + h·w, D)`` for ``height × width`` pixels.

    As the official ``interpolate_pos_encoding``: ``stored`` itself when the input is square
    and has as many patches as the stored grid; otherwise the stored ``M × M`` grid
    resampled in float32 by ``F.interpolate(mode="bicubic", antialias=antialias)`` with
    ``scale_factor = ((h + offset) / M, (w + offset) / M)`` when ``offset`` is non-zero, else
    ``size = (h, w)`` (``align_corners`` False), the CLS position unchanged, in
    ``stored``'s dtype.
    """
    n, dim = stored.shape[1] - 1, stored.shape[2]
    rows, cols = height // patch_size, width // patch_size
    if rows * cols == n and height == width:
        return stored
    m = math.isqrt(n)
    if m * m != n:
        raise ModelError(
            f"the positional embedding holds {n} patch positions; expected a square grid "
            "(the checkpoint's pos_embed is (1, 1 + M·M, D))."
        )
    grid = stored[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        grid = nn.functional.interpolate(
            grid,
            scale_factor=((rows + offset) / m, (cols + offset) / m),
            mode="bicubic",
            align_corners=False,
            antialias=antialias,
        )
    else:
        grid = nn.functional.interpolate(
            grid, size=(rows, cols), mode="bicubic", align_corners=False, antialias=antialias
        )
    if tuple(grid.shape[-2:]) != (rows, cols):
        raise ModelError(
            f"resampling the {m}×{m} positional grid gave {tuple(grid.shape[-2:])}; "
            f"expected {(rows, cols)} for a {height}×{width} input. Choose another input "
            f"size (a multiple of the patch size, {patch_size})."
        )
    patch = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat((stored[:, :1].float(), patch), dim=1).to(stored.dtype)


class _OfficialInterpolation:
    """Mixin for transformers' DINOv2 embeddings: the official interpolation, with this
    instance's ``interpolate_offset`` and ``interpolate_antialias``."""

    interpolate_offset: float = 0.1
    interpolate_antialias: bool = False
    position_embeddings: nn.Parameter
    config: object

    def interpolate_pos_encoding(
        self, embeddings: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        pos = interpolate_pos_embed(
            self.position_embeddings,
            height,
            width,
            int(self.config.patch_size),  # type: ignore[attr-defined]
            offset=self.interpolate_offset,
            antialias=self.interpolate_antialias,
        )
        return pos.to(embeddings.dtype)


class OfficialDinov2Embeddings(_OfficialInterpolation, Dinov2Embeddings):  # type: ignore[misc]
    """transformers' ``Dinov2Embeddings`` with the official interpolation."""


class OfficialDinov2WithRegistersEmbeddings(
    _OfficialInterpolation,
    Dinov2WithRegistersEmbeddings,  # type: ignore[misc]  # transformers is not followed
):
    """transformers' ``Dinov2WithRegistersEmbeddings`` with the official interpolation."""


#: transformers' embeddings class -> (its subclass, the arch whose settings it takes).
_SUBCLASS: dict[type, tuple[type, str]] = {
    Dinov2Embeddings: (OfficialDinov2Embeddings, "dinov2"),
    Dinov2WithRegistersEmbeddings: (OfficialDinov2WithRegistersEmbeddings, "dinov2-reg"),
}


def uses_official_interpolation(cfg: ModelCfg) -> bool:
    """Whether radcache runs ``cfg`` with the official interpolation: the released DINOv2
    weights (``facebook/dinov2-*``, with or without registers) and the random-weight models
    standing in for them. Other checkpoints (RAD-DINO, local directories) keep
    transformers' own method."""
    if cfg.arch not in OFFICIAL_SETTINGS:
        return False
    return cfg.random_weights or (cfg.hf_id or "").startswith(_RELEASE_PREFIX)


def with_official_interpolation(model: nn.Module) -> nn.Module:
    """``model`` (transformers' ``Dinov2Model`` or ``Dinov2WithRegistersModel``) with its
    embeddings module turned into the subclass that interpolates as the released models of
    its kind do (:data:`OFFICIAL_SETTINGS`); a plain model also declares
    :data:`OUTPUT_VERSION`, which the weights hash includes."""
    embeddings: Any = getattr(model, "embeddings", None)
    if isinstance(embeddings, _OfficialInterpolation):
        return model
    found = _SUBCLASS.get(type(embeddings))
    if found is None:
        raise ModelError(
            "the official DINOv2 interpolation applies to transformers' Dinov2Model or "
            f"Dinov2WithRegistersModel; got {type(model).__name__} with embeddings "
            f"{type(embeddings).__name__}. Load the model with load_backbone."
        )
    subclass, arch = found
    embeddings.__class__ = subclass
    embeddings.interpolate_offset, embeddings.interpolate_antialias = OFFICIAL_SETTINGS[arch]
    if arch == "dinov2":
        model.output_version = OUTPUT_VERSION  # type: ignore[assignment]  # an int attribute
    return model
