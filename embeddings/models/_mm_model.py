"""MM-DINOv2's model: one frozen DINOv2 pass over several MRI sequences, missing ones masked.

Scholz et al., MICCAI 2025, "MM-DINOv2: Adapting Foundation Models for Multi-Modal Medical
Image Analysis". Each sequence's slice goes through the backbone's patch embedding and gets
the backbone's positional embedding, interpolated as the reference code does; a learned
sequence embedding (unit norm), chosen by the sequence's name, is added to its patch tokens;
the tokens of all sequences follow a single CLS token (then the register tokens, for DINOv2
with registers) through the backbone's blocks and final layer norm.

Reference: ``GliomaDinoViT`` and ``DinoVisionTransformer.interpolate_pos_encoding`` in
dinov2/models/vision_transformer.py of github.com/daniel-scholz/mm-dinov2.

A missing sequence is masked, not dropped: its patch embeddings are replaced by the backbone's
mask token *before* the positional and sequence embeddings are added, as DINOv2 masks patches
(and as MM-DINOv2's own code masks a sequence). Every study therefore lists every sequence of
the vocabulary, with ``present`` saying which ones were acquired.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputError, ModelError
from ._pos_embed import interpolate_pos_embed
from ._registry import MM_SEQUENCES

__all__ = ["SEQUENCES", "MMDinov2", "MMOutput"]

#: The sequence names, in the row order of the sequence-embedding table, which always has
#: these four rows (the reference's ``mri_sequences_default``). A model's ``sequences``
#: list its inputs in any order, or a subset of them; each takes the row of its name.
SEQUENCES: tuple[str, ...] = MM_SEQUENCES
#: Added to the target grid size before the positional grid is resampled by scale factor,
#: as the reference does ("to avoid floating point error", facebookresearch/dino issue 8).
POS_OFFSET = 0.1
_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


@dataclass(frozen=True)
class MMOutput:
    """One forward pass: a study's CLS token and every sequence's patch grid."""

    cls: torch.Tensor  # (B, D) after the final layer norm
    patch: torch.Tensor  # (B, S, h, w, D); rows of missing sequences are mask-token outputs
    present: torch.Tensor  # (B, S) bool, as given


class MMDinov2(nn.Module):
    """A frozen HF DINOv2 backbone (with or without registers) plus a sequence embedding.

    ``sequence_embedding`` is ``(4, D)``, one row per name of :data:`SEQUENCES` in that
    order; ``sequences`` names the model's inputs in the order they are given (a training
    config's ``mri_sequences``, e.g. ``t2,t1,t1c,flair``) and maps each to its row by name,
    as the reference's ``mri_seq_idx_map`` does. The backbone's own modules do the rest
    (patch embedding, CLS/mask/register tokens, blocks with its attention implementation,
    final norm); the positional embedding is interpolated as the reference does
    (:meth:`position_embedding`). On the backbone's native grid, with one sequence and a
    zero sequence embedding, the outputs are those of ``backbone(pixel_values=x)``.
    """

    #: Bumped whenever the outputs change for the same weights; part of the weights hash,
    #: hence of every cache key and space. 2: rows by name, the reference's interpolation.
    output_version = 2

    def __init__(
        self,
        backbone: nn.Module,
        sequence_embedding: torch.Tensor,
        sequences: Sequence[str] = SEQUENCES,
        *,
        untrained: bool = False,
    ) -> None:
        super().__init__()
        seqs = tuple(sequences)
        if not seqs or len(set(seqs)) != len(seqs):
            raise ValueError(f"sequences must be distinct names, at least one; got {seqs}")
        unknown = [s for s in seqs if s not in SEQUENCES]
        if unknown:
            raise ModelError(
                f"MM-DINOv2 has sequence embeddings for {', '.join(SEQUENCES)} only; got "
                f"{unknown} in {seqs}. Name every input with one of these names (in any "
                "order, or a subset of them)."
            )
        config = getattr(backbone, "config", None)
        embeddings = getattr(backbone, "embeddings", None)
        if (
            getattr(config, "model_type", None) not in _MODEL_TYPES
            or getattr(embeddings, "mask_token", None) is None
        ):
            raise ModelError(
                f"MM-DINOv2 needs a Hugging Face Dinov2Model or Dinov2WithRegistersModel with "
                f"a mask token; got {type(backbone).__name__}. Build it with "
                "build_random/load_backbone, or with use_mask_token=True in its config."
            )
        dim = int(config.hidden_size)  # type: ignore[union-attr]
        if tuple(sequence_embedding.shape) != (len(SEQUENCES), dim):
            raise ValueError(
                f"sequence_embedding has shape {tuple(sequence_embedding.shape)}; expected "
                f"({len(SEQUENCES)}, {dim}): one row of the backbone's width per name of "
                f"{SEQUENCES}, in that order, whatever the order of sequences {seqs}."
            )
        self.backbone = backbone.eval().requires_grad_(False)
        self.sequences = seqs
        weight = next(backbone.parameters())
        self.sequence_embedding = nn.Parameter(
            sequence_embedding.detach().to(weight.device, weight.dtype).clone(),
            requires_grad=False,
        )
        #: Row of the sequence embedding for each of ``sequences``, in their order.
        self.sequence_rows: torch.Tensor
        self.register_buffer(
            "sequence_rows",
            torch.tensor([SEQUENCES.index(s) for s in seqs], device=weight.device),
            persistent=False,
        )
        #: True while the sequence embeddings are random (not trained): labels say so.
        self.untrained = untrained
        self.dim = dim
        self.patch_size = int(config.patch_size)  # type: ignore[union-attr]
        self.num_registers = int(getattr(config, "num_register_tokens", 0))
        self.channels = int(config.num_channels)  # type: ignore[union-attr]
        self.eval()

    @classmethod
    def from_backbone(
        cls, backbone: nn.Module, sequences: Sequence[str] = SEQUENCES, seed: int = 0
    ) -> MMDinov2:
        """``backbone`` with seeded random sequence embeddings (N(0, 0.02²)), flagged untrained."""
        dim = int(getattr(getattr(backbone, "config", None), "hidden_size", 0))
        g = torch.Generator().manual_seed(seed)
        emb = torch.randn(len(SEQUENCES), dim, generator=g) * 0.02
        return cls(backbone, emb, sequences, untrained=True)

    # -- the HF modules, reached through the backbone (not registered twice) ------------------

    @property
    def _embeddings(self) -> Any:
        return self.backbone.embeddings

    @property
    def _config(self) -> Any:
        return self.backbone.config

    # -- forward --------------------------------------------------------------------------------

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """The positional embedding ``(1, 1 + h·w, D)`` for ``height × width`` pixels.

        As the reference's ``interpolate_pos_encoding``: the stored embedding when the input
        is square and has as many patches as the stored grid; otherwise the stored
        ``M × M`` grid resampled in float32 by ``F.interpolate(mode="bicubic")`` with
        ``scale_factor = ((h + 0.1) / M, (w + 0.1) / M)`` (no output size, no antialiasing,
        ``align_corners`` False), the CLS position unchanged, in the embedding's dtype
        (:func:`~._pos_embed.interpolate_pos_embed`, whatever the backbone's kind).
        """
        return interpolate_pos_embed(
            self._embeddings.position_embeddings,
            height,
            width,
            self.patch_size,
            offset=POS_OFFSET,
            antialias=False,
        )

    def embed_tokens(
        self,
        pixels: torch.Tensor,
        present: torch.Tensor,
        sequence_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The token sequence entering the blocks: ``(B, 1 + R + S·h·w, D)``.

        Layout: CLS, the R register tokens, then each sequence's ``h·w`` patch tokens in the
        order given. A present sequence's patch token is ``patch + pos + e``; a missing one's
        is ``mask_token + pos + e`` (the pixels are not read), where ``pos`` is
        :meth:`position_embedding` and ``e`` is the row of the sequence's name divided by its
        L2 norm (an all-zero row stays zero).
        """
        x, present, ids = self._check(pixels, present, sequence_ids)
        b, s, c, height, width = x.shape
        emb = self._embeddings
        patch = emb.patch_embeddings(x.reshape(b * s, c, height, width))  # (B·S, N, D)
        n, d = patch.shape[1], patch.shape[2]
        missing = ~present.reshape(b * s, 1, 1)
        patch = torch.where(missing, emb.mask_token.to(patch.dtype).unsqueeze(0), patch)
        pos = self.position_embedding(height, width)
        cls = emb.cls_token.expand(b, -1, -1) + pos[:, :1]
        unit = nn.functional.normalize(self.sequence_embedding, p=2.0, dim=-1)
        patch = patch.reshape(b, s, n, d) + pos[:, 1:].unsqueeze(1)
        patch = patch + unit[self.sequence_rows[ids]].to(patch.dtype).unsqueeze(2)
        parts = [cls]
        if self.num_registers:
            parts.append(emb.register_tokens.expand(b, -1, -1))
        parts.append(patch.reshape(b, s * n, d))
        tokens: torch.Tensor = emb.dropout(torch.cat(parts, dim=1))
        return tokens

    def forward(
        self,
        pixels: torch.Tensor,
        present: torch.Tensor,
        sequence_ids: torch.Tensor | None = None,
    ) -> MMOutput:
        """Encode a batch of studies.

        ``pixels``: ``(B, S, 3, H, W)``, or ``(B, S, H, W)`` grayscale (replicated to 3
        channels). ``present``: ``(B, S)`` bool. ``sequence_ids``: ``(S,)`` or ``(B, S)``
        indices into :attr:`sequences` (default: the vocabulary order); each study lists every
        sequence exactly once, missing ones marked absent in ``present``.
        """
        tokens = self.embed_tokens(pixels, present, sequence_ids)
        # As Dinov2Model.forward after its embeddings: no attention mask (every token sees
        # every token), the encoder's blocks, then the final layer norm.
        backbone: Any = self.backbone
        hidden = backbone.encoder(tokens)[0]
        out: torch.Tensor = backbone.layernorm(hidden)
        b, s = present.shape
        h, w = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        patch = out[:, 1 + self.num_registers :].reshape(b, s, h, w, self.dim)
        return MMOutput(cls=out[:, 0], patch=patch, present=present.to(out.device))

    def _check(
        self, pixels: torch.Tensor, present: torch.Tensor, sequence_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs as ``(pixels (B, S, C, H, W), present (B, S), ids (B, S))``, or a clear error."""
        if pixels.dim() == 4:
            pixels = pixels.unsqueeze(2)
        if pixels.dim() != 5:
            raise ValueError(
                f"pixels has shape {tuple(pixels.shape)}; expected (B, S, 3, H, W) or "
                "(B, S, H, W): a batch of studies, one slice per sequence."
            )
        b, s, c = pixels.shape[:3]
        channels = self.channels
        if c == 1 and channels != 1:
            pixels = pixels.expand(b, s, channels, *pixels.shape[3:])
        elif c != channels:
            raise ValueError(f"pixels has {c} channels per sequence; expected 1 or {channels}.")
        n = len(self.sequences)
        if s != n:
            raise ValueError(
                f"pixels holds {s} sequences per study; expected all {n} of {self.sequences}. "
                "MM-DINOv2 masks a missing sequence rather than dropping it: pass a slice "
                "(any values, e.g. zeros) for it and mark it absent in `present`."
            )
        if present.dtype != torch.bool or tuple(present.shape) != (b, s):
            raise ValueError(
                f"present is {present.dtype} {tuple(present.shape)}; expected torch.bool "
                f"({b}, {s}): True where the study has that sequence."
            )
        present = present.to(pixels.device)
        empty = (~present.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise InputError(
                f"studies at batch rows {empty} have none of the sequences {self.sequences}; "
                "MM-DINOv2 needs at least one present sequence per study. Leave such "
                "studies out of the batch."
            )
        ids = (
            torch.arange(n, device=pixels.device)
            if sequence_ids is None
            else sequence_ids.to(pixels.device)
        )
        if ids.dtype != torch.long or ids.shape not in ((s,), (b, s)):
            raise ValueError(
                f"sequence_ids is {ids.dtype} {tuple(ids.shape)}; expected torch.long ({s},) "
                f"or ({b}, {s}): indices into {self.sequences}."
            )
        ids = ids.expand(b, s)
        if not torch.equal(ids.sort(dim=1).values, torch.arange(n, device=ids.device).expand(b, n)):
            raise ValueError(
                f"sequence_ids {ids.tolist()} must list each of the {n} sequences "
                f"{self.sequences} exactly once per study."
            )
        return pixels, present, ids
