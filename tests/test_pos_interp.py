"""DINOv2's positional embedding is interpolated as the official release does, per model.

Reference: ``interpolate_pos_encoding`` in dinov2/models/vision_transformer.py and the
per-model settings in dinov2/hub/backbones.py of facebookresearch/dinov2: offset 0.1 without
antialiasing for the plain models, an output size with antialiasing for the ``_reg`` ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, Dinov2Model
from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import (
    Dinov2WithRegistersEmbeddings,
)

from radcache.embeddings.encode import Encoder, load_encoder, weights_hash
from radcache.embeddings.errors import ModelError
from radcache.embeddings.models import REGISTRY, build_random, get_cfg
from radcache.embeddings.models._pos_embed import (
    OUTPUT_VERSION,
    uses_official_interpolation,
    with_official_interpolation,
)

TINY = REGISTRY["dinov2-tiny-random"]
#: The released checkpoints' geometry: a 37×37 grid (img_size 518, patch 14).
PLAIN = dataclasses.replace(TINY, image_size=518)
REG = dataclasses.replace(PLAIN, arch="dinov2-reg", num_registers=4)
SIZES = [(224, 224), (224, 98), (518, 518)]


def _official(stored: torch.Tensor, height: int, width: int, reg: bool) -> torch.Tensor:
    """dinov2/models/vision_transformer.py, called here with the hub's arguments."""
    h, w = height // 14, width // 14
    if (h, w) == (37, 37):
        return stored
    grid = stored[:, 1:].float().reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    if reg:  # dinov2_vit*14_reg: interpolate_offset=0.0, interpolate_antialias=True
        out = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
    else:  # dinov2_vit*14: interpolate_offset=0.1, interpolate_antialias=False
        scale = ((h + 0.1) / 37, (w + 0.1) / 37)
        out = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
    return torch.cat((stored[:, :1], out.permute(0, 2, 3, 1).reshape(1, h * w, -1)), dim=1)


def _pos(emb: Any, height: int, width: int, method: Any = None) -> torch.Tensor:
    dummy = emb.position_embeddings.new_empty(1, 1 + (height // 14) * (width // 14), TINY.dim)
    with torch.inference_mode():
        pos: torch.Tensor = (method or type(emb).interpolate_pos_encoding)(
            emb, dummy, height, width
        )
    return pos


@pytest.mark.parametrize(("height", "width"), SIZES)
@pytest.mark.parametrize(
    ("cfg", "theirs_method"),
    [
        (PLAIN, Dinov2Embeddings.interpolate_pos_encoding),
        (REG, Dinov2WithRegistersEmbeddings.interpolate_pos_encoding),
    ],
    ids=["plain-offset", "reg-antialias"],
)
def test_the_grid_is_the_releases(cfg: Any, theirs_method: Any, height: int, width: int) -> None:
    emb: Any = build_random(cfg).embeddings
    reg = cfg.num_registers > 0
    want = _official(emb.position_embeddings, height, width, reg=reg)
    assert torch.equal(_pos(emb, height, width), want)
    theirs = _pos(emb, height, width, theirs_method)
    if reg or (height, width) == (518, 518):
        # transformers' with-registers method already computes the release's grid; on the
        # stored grid size both return the stored grid
        assert torch.equal(theirs, want)
    else:  # transformers' plain method passes an output size instead
        assert (theirs - want).abs().max() > 1e-3


@pytest.mark.parametrize("cfg", [PLAIN, REG], ids=["plain", "reg"])
def test_the_forward_adds_the_official_grid(cfg: Any) -> None:
    """The whole model's output equals the blocks run on tokens carrying the expected grid."""
    model: Any = build_random(cfg).eval()
    x = torch.randn(2, 3, 224, 98, generator=torch.Generator().manual_seed(1))
    emb = model.embeddings
    with torch.inference_mode():
        got = model(pixel_values=x).last_hidden_state
        pos = _official(emb.position_embeddings, 224, 98, reg=cfg.num_registers > 0)
        tokens = torch.cat((emb.cls_token.expand(2, -1, -1), emb.patch_embeddings(x)), 1) + pos
        if cfg.num_registers:
            regs = emb.register_tokens.expand(2, -1, -1)
            tokens = torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)
        want = model.layernorm(model.encoder(tokens)[0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_parity_with_plain_transformers_at_the_native_size_only() -> None:
    """Through the Encoder: the same as transformers' forward on the 37×37 grid (518 px),
    not at 224 px, where only the interpolation differs."""
    enc = Encoder(PLAIN, build_random(PLAIN), torch.device("cpu"), "fp32")
    plain = Dinov2Model(enc.model.config).eval()  # type: ignore[arg-type]
    plain.load_state_dict(enc.model.state_dict())
    g = torch.Generator().manual_seed(2)
    for size, same in ((518, True), (224, False)):
        x = torch.randn(2, 3, size, size, generator=g)
        cls = enc.forward(x)[0]
        with torch.inference_mode():
            ref = plain(pixel_values=x).last_hidden_state[:, 0]
        if same:
            torch.testing.assert_close(cls, ref, rtol=0, atol=1e-5)
        else:
            assert (cls - ref).abs().max() > 1e-3


def test_only_models_radcache_builds_change() -> None:
    model = build_random(PLAIN)
    assert getattr(model, "output_version", None) == OUTPUT_VERSION
    assert not hasattr(build_random(REG), "output_version")  # its outputs did not change
    other: Any = Dinov2Model(model.config)  # type: ignore[arg-type]
    assert type(other.embeddings) is Dinov2Embeddings  # transformers itself is untouched
    assert all(uses_official_interpolation(get_cfg(n)) for n in ("dinov2-base", "dinov2-giant-reg"))
    assert not uses_official_interpolation(get_cfg("rad-dino"))
    assert with_official_interpolation(model) is model  # already done: unchanged
    with pytest.raises(ModelError, match="Dinov2Model or Dinov2WithRegistersModel"):
        with_official_interpolation(torch.nn.Linear(2, 2))


def _fake_hub(root: Path, hf_id: str, model: Any) -> None:
    """``model`` as the Hugging Face cache holds a download of ``hf_id``."""
    repo = root / f"models--{hf_id.replace('/', '--')}"
    model.save_pretrained(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_hub_models_rad_dino_keeps_transformers_method(tmp_path: Path) -> None:
    """The same weights cached as facebook/dinov2-small and as microsoft/rad-dino: the
    released model interpolates as the release does (and hashes with its output version),
    RAD-DINO as transformers does."""
    weights = build_random(PLAIN)
    for hf_id in ("facebook/dinov2-small", "microsoft/rad-dino"):
        _fake_hub(tmp_path, hf_id, weights)
    kw: dict[str, Any] = {"device": "cpu", "precision": "fp32", "cache_dir": str(tmp_path)}
    dino = load_encoder("dinov2-small", offline=True, **kw)
    rad = load_encoder("rad-dino", offline=True, **kw)
    plain: Any = AutoModel.from_pretrained(
        tmp_path / "models--microsoft--rad-dino/snapshots" / ("0" * 40)
    )
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = plain.eval()(pixel_values=x).last_hidden_state[:, 0]
    assert torch.equal(rad.forward(x)[0], ref)
    assert (dino.forward(x)[0] - ref).abs().max() > 1e-3
    assert rad.weights_hash == weights_hash(plain) != dino.weights_hash
