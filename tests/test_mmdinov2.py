"""MM-DINOv2: parity with plain DINOv2, order invariance, sequence rows by name, the
reference's positional interpolation, masking, strict checkpoints.

The backbone is dinov2-tiny-random (RANDOM WEIGHTS, tests only), fp32 on the CPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel
from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings

from radcache.embeddings.encode import weights_hash
from radcache.embeddings.errors import InputError, ModelError
from radcache.embeddings.models import (
    SEQUENCES,
    MMDinov2,
    ModelCfg,
    build_random,
    convert,
    get_cfg,
    load_converted,
    load_training_checkpoint,
    save_training_checkpoint,
)

TINY = get_cfg("dinov2-tiny-random")
TINY_REG = dataclasses.replace(TINY, arch="dinov2-reg", num_registers=4)
ARCHS = pytest.mark.parametrize("cfg", [TINY, TINY_REG], ids=["dinov2", "dinov2-reg"])


def _study(b: int = 2, s: int = 4, size: int = 112, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, 3, size, size, generator=g)


def _model(cfg: ModelCfg = TINY, seed: int = 0) -> MMDinov2:
    return MMDinov2.from_backbone(build_random(cfg), seed=seed)


def _run(model: MMDinov2, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        out = model(*args)
    return out.cls, out.patch


@ARCHS
def test_one_sequence_with_zero_embedding_is_plain_dinov2_on_the_native_grid(
    cfg: ModelCfg,
) -> None:
    backbone = build_random(cfg)
    model = MMDinov2.from_backbone(backbone, sequences=("t1",))
    with torch.no_grad():
        model.sequence_embedding.zero_()
    size = cfg.image_size
    x = _study(b=3, s=1, size=size)
    cls, patch = _run(model, x, torch.ones(3, 1, dtype=torch.bool))
    with torch.inference_mode():
        ref = backbone(pixel_values=x[:, 0]).last_hidden_state
    g = size // cfg.patch_size
    assert patch.shape == (3, 1, g, g, cfg.dim)
    # same modules, same operations in the same order: bit for bit
    assert torch.equal(cls, ref[:, 0])
    assert torch.equal(patch.reshape(3, g * g, -1), ref[:, 1 + cfg.num_registers :])


def test_grayscale_slices_are_replicated_to_three_channels() -> None:
    model = _model()
    gray = _study()[:, :, 0]
    present = torch.ones(2, 4, dtype=torch.bool)
    a = _run(model, gray, present)
    b = _run(model, gray.unsqueeze(2).repeat(1, 1, 3, 1, 1), present)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@ARCHS
def test_sequence_order_does_not_matter(cfg: ModelCfg) -> None:
    model = _model(cfg)
    x = _study()
    present = torch.tensor([[True, True, False, True], [True, True, True, True]])
    cls, patch = _run(model, x, present, torch.arange(4))
    perm = torch.tensor([2, 0, 3, 1])
    cls_p, patch_p = _run(model, x[:, perm], present[:, perm], perm)
    torch.testing.assert_close(cls_p, cls, rtol=0, atol=1e-5)
    torch.testing.assert_close(patch_p, patch[:, perm], rtol=0, atol=1e-5)
    # a different order per study, given as (B, S) ids
    rows = torch.stack([perm, torch.tensor([3, 2, 1, 0])])
    x_r = torch.stack([x[i, rows[i]] for i in range(2)])
    present_r = torch.stack([present[i, rows[i]] for i in range(2)])
    cls_r, patch_r = _run(model, x_r, present_r, rows)
    torch.testing.assert_close(cls_r, cls, rtol=0, atol=1e-5)
    for i in range(2):
        torch.testing.assert_close(patch_r[i], patch[i, rows[i]], rtol=0, atol=1e-5)


#: The published training config's order (mri_sequences=t2,t1,t1c,flair in
#: dinov2/configs/train/glioma_vitb14_mm-dino_v2.yaml of daniel-scholz/mm-dinov2).
CONFIG_ORDER = ("t2", "t1", "t1c", "flair")


@pytest.mark.parametrize(
    "order", [CONFIG_ORDER, ("flair", "t1"), ("t1c",)], ids=["config", "subset", "one"]
)
def test_each_sequence_takes_the_row_of_its_name(order: tuple[str, ...]) -> None:
    model = MMDinov2.from_backbone(build_random(TINY), sequences=order)
    with torch.no_grad():  # row r points along axis r: each row tells its name
        model.sequence_embedding.copy_(torch.eye(4, TINY.dim) * torch.arange(1.0, 5.0)[:, None])
    s, n = len(order), (TINY.image_size // TINY.patch_size) ** 2
    x, present = _study(s=s), torch.ones(2, s, dtype=torch.bool)
    with torch.inference_mode():
        tokens = model.embed_tokens(x, present)
    with torch.no_grad():
        model.sequence_embedding.zero_()
    with torch.inference_mode():
        added = (tokens - model.embed_tokens(x, present))[:, 1:].reshape(2, s, n, TINY.dim)
    for j, name in enumerate(order):
        axis = torch.zeros(TINY.dim)
        axis[["t1", "t1c", "t2", "flair"].index(name)] = 1.0
        torch.testing.assert_close(added[:, j], axis.expand(2, n, -1), rtol=0, atol=1e-6)


def test_the_configured_order_changes_no_output(tmp_path: Path) -> None:
    canonical = _model()
    ckpt = save_training_checkpoint(canonical, tmp_path / "c.pth")
    permuted = load_training_checkpoint(ckpt, arch_cfg=TINY, sequences=CONFIG_ORDER)
    assert torch.equal(permuted.sequence_embedding, canonical.sequence_embedding)
    idx = [SEQUENCES.index(s) for s in CONFIG_ORDER]  # inputs given in the config's order
    x = _study()
    present = torch.tensor([[True, False, True, True], [True, True, True, True]])
    cls, patch = _run(canonical, x, present)
    cls_p, patch_p = _run(permuted, x[:, idx], present[:, idx])
    torch.testing.assert_close(cls_p, cls, rtol=0, atol=1e-5)
    torch.testing.assert_close(patch_p, patch[:, idx], rtol=0, atol=1e-5)
    out = convert(ckpt, tmp_path / "conv", arch_cfg=TINY, sequences=CONFIG_ORDER)
    reloaded = load_converted(out)
    assert reloaded.sequences == CONFIG_ORDER
    for got, want in zip(_run(reloaded, x[:, idx], present[:, idx]), (cls_p, patch_p), strict=True):
        assert torch.equal(got, want)


def test_names_outside_the_four_rows_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"t1, t1c, t2, flair only; got \['dwi'\]"):
        MMDinov2.from_backbone(build_random(TINY), sequences=("t1", "dwi"))
    state = torch.load(save_training_checkpoint(_model(), tmp_path / "c.pth"), weights_only=True)
    rows = state["teacher"]["backbone.mri_seq_embed.weight"]
    state["teacher"]["backbone.mri_seq_embed.weight"] = rows[:3]
    with pytest.raises(ModelError, match=r"mri_seq_embed\.weight \(3, 64\) \(expected \(4, 64\)"):
        load_training_checkpoint(state, arch_cfg=TINY, sequences=("t1", "t1c", "t2"))


#: The published checkpoint's positional grid: 37×37 (img_size 518, patch 14).
REF_GRID = dataclasses.replace(TINY, image_size=518)


@pytest.mark.parametrize(("height", "width"), [(224, 224), (224, 98), (518, 518)])
def test_positional_embedding_is_interpolated_as_the_reference_does(
    height: int, width: int
) -> None:
    model = _model(REF_GRID)
    emb: Any = model.backbone.embeddings  # a Dinov2Embeddings
    stored: torch.Tensor = emb.position_embeddings
    h, w = height // 14, width // 14
    # DinoVisionTransformer.interpolate_pos_encoding (dinov2/models/vision_transformer.py of
    # daniel-scholz/mm-dinov2): the stored grid on its own square size, else scale factors
    # with a 0.1 offset, bicubic, torch's defaults otherwise.
    if (h, w) == (37, 37):
        want = stored
    else:
        grid = stored[:, 1:].reshape(1, 37, 37, TINY.dim).permute(0, 3, 1, 2)
        scaled = torch.nn.functional.interpolate(
            grid, scale_factor=((h + 0.1) / 37, (w + 0.1) / 37), mode="bicubic"
        )
        want = torch.cat((stored[:, :1], scaled.permute(0, 2, 3, 1).reshape(1, h * w, -1)), 1)
        # not transformers' interpolation (an output size instead of scale factors)
        dummy = stored.new_empty(1, 1 + h * w, TINY.dim)
        sized = Dinov2Embeddings.interpolate_pos_encoding(emb, dummy, height, width)
        assert not torch.allclose(sized, want, rtol=0, atol=1e-4)
    x = torch.randn(1, 4, 3, height, width, generator=torch.Generator().manual_seed(0))
    present = torch.tensor([[True, False, False, False]])
    with torch.inference_mode():
        assert torch.equal(model.position_embedding(height, width), want)
        tokens = model.embed_tokens(x, present)
    unit = torch.nn.functional.normalize(model.sequence_embedding, dim=-1)
    assert torch.equal(tokens[:, 0], emb.cls_token[:, 0] + want[:, 0])
    masked = tokens[0, 1 + 3 * h * w :]  # flair: missing, so mask token + pos + e
    assert torch.equal(masked, (emb.mask_token + want[0, 1:]) + unit[3])


def test_the_output_version_is_part_of_the_weights_hash() -> None:
    model = _model()
    current = weights_hash(model)
    model.output_version = 1  # outputs before rows by name
    assert weights_hash(model) != current
    del model.output_version
    assert weights_hash(model) == current


@ARCHS
def test_missing_sequence_enters_as_mask_token_plus_pos_plus_sequence_embedding(
    cfg: ModelCfg,
) -> None:
    model = _model(cfg)
    x = _study()
    present = torch.tensor([[True, False, True, True], [True, True, True, True]])
    with torch.inference_mode():
        tokens = model.embed_tokens(x, present)
    emb = model.backbone.embeddings
    n, r = (112 // cfg.patch_size) ** 2, cfg.num_registers
    assert tokens.shape == (2, 1 + r + 4 * n, cfg.dim)
    unit = torch.nn.functional.normalize(model.sequence_embedding, dim=-1)
    pos = emb.position_embeddings[:, 1:]
    with torch.inference_mode():
        masked = (emb.mask_token.unsqueeze(0) + pos) + unit[1]
        seen = (emb.patch_embeddings(x[1, 1:2]) + pos) + unit[1]
    assert torch.equal(tokens[0, 1 + r + n : 1 + r + 2 * n], masked[0])
    assert torch.equal(tokens[1, 1 + r + n : 1 + r + 2 * n], seen[0])
    assert torch.equal(
        tokens[:, 0], (emb.cls_token + emb.position_embeddings[:, :1])[0].expand(2, -1)
    )
    if r:
        assert torch.equal(tokens[:, 1 : 1 + r], emb.register_tokens.expand(2, -1, -1))
    # the pixels of a missing sequence are never read
    x_nan = x.clone()
    x_nan[0, 1] = float("nan")
    cls, patch = _run(model, x, present)
    cls_nan, patch_nan = _run(model, x_nan, present)
    assert torch.equal(cls, cls_nan) and torch.equal(patch, patch_nan)


def test_every_non_empty_subset_of_sequences_runs() -> None:
    model = _model()
    subsets = [c for k in range(1, 5) for c in itertools.combinations(range(4), k)]
    assert len(subsets) == 15
    present = torch.zeros(15, 4, dtype=torch.bool)
    for row, subset in enumerate(subsets):
        present[row, list(subset)] = True
    x = _study(b=1).expand(15, -1, -1, -1, -1)  # the same study, 15 ways incomplete
    with torch.inference_mode():
        out = model(x, present)
    assert out.cls.shape == (15, TINY.dim) and out.patch.shape == (15, 4, 8, 8, TINY.dim)
    assert torch.isfinite(out.cls).all() and torch.isfinite(out.patch).all()
    assert torch.equal(out.present, present)
    assert len({tuple(v.tolist()) for v in out.cls}) == 15  # each subset its own vector


def test_a_study_without_any_sequence_is_refused() -> None:
    present = torch.tensor([[True, False, False, False], [False, False, False, False]])
    with pytest.raises(InputError, match=r"rows \[1\] have none of the sequences"):
        _model()(_study(), present)


@pytest.mark.parametrize(
    ("pixels", "present", "ids", "match"),
    [
        (_study(s=3), torch.ones(2, 3, dtype=torch.bool), None, "expected all 4"),
        (_study(), torch.ones(2, 4), None, "expected torch.bool"),
        (_study(), torch.ones(2, 4, dtype=torch.bool), torch.tensor([0, 1, 1, 3]), "exactly once"),
        (_study(), torch.ones(2, 4, dtype=torch.bool), torch.tensor([0.0, 1, 2, 3]), "torch.long"),
        (_study()[:, :, :2], torch.ones(2, 4, dtype=torch.bool), None, "channels"),
    ],
    ids=["fewer-sequences", "present-not-bool", "duplicate-id", "float-ids", "two-channels"],
)
def test_malformed_inputs_say_what_was_expected(
    pixels: torch.Tensor, present: torch.Tensor, ids: torch.Tensor | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        _model()(pixels, present, ids)


def test_untrained_sequence_embeddings_are_seeded_and_flagged() -> None:
    backbone = build_random(TINY)
    a = MMDinov2.from_backbone(backbone, seed=0)
    b = MMDinov2.from_backbone(backbone, seed=0)
    c = MMDinov2.from_backbone(backbone, seed=1)
    assert a.untrained and a.sequences == SEQUENCES
    assert torch.equal(a.sequence_embedding, b.sequence_embedding)
    assert not torch.equal(a.sequence_embedding, c.sequence_embedding)
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def _assert_same_model(a: MMDinov2, b: MMDinov2) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [
        k for k in sa if not torch.equal(sa[k], sb[k])
    ]
    x, present = _study(b=1), torch.tensor([[True, False, True, True]])
    for got, want in zip(_run(a, x, present), _run(b, x, present), strict=True):
        assert torch.equal(got, want)


@ARCHS
@pytest.mark.parametrize(
    ("prefix", "wrapper"),
    [
        ("backbone.", "teacher"),
        ("teacher.backbone.", "model"),
        ("teacher.backbone.", None),
        ("", None),
    ],
    ids=["teacher_checkpoint", "trainer-checkpoint", "flat", "bare"],
)
def test_checkpoint_save_convert_load_round_trips_bit_exactly(
    tmp_path: Path, cfg: ModelCfg, prefix: str, wrapper: str | None
) -> None:
    model = _model(cfg)
    ckpt = save_training_checkpoint(model, tmp_path / "ckpt.pth", prefix=prefix, wrapper=wrapper)
    loaded = load_training_checkpoint(ckpt, arch_cfg=cfg)
    assert not loaded.untrained
    _assert_same_model(loaded, model)
    out = convert(ckpt, tmp_path / "converted", arch_cfg=cfg)
    config = json.loads((out / "config.json").read_text())
    assert config["mm_dinov2"] == {
        "sequences": list(SEQUENCES),
        "untrained_sequence_embedding": False,
    }
    _assert_same_model(load_converted(out), model)


def test_training_names_follow_the_dinov2_training_code(tmp_path: Path) -> None:
    model = _model()
    state = torch.load(save_training_checkpoint(model, tmp_path / "c.pth"), weights_only=True)
    keys = set(state["teacher"])
    assert {
        "backbone.cls_token",
        "backbone.pos_embed",
        "backbone.mask_token",
        "backbone.patch_embed.proj.weight",
        "backbone.blocks.1.attn.qkv.weight",
        "backbone.blocks.1.attn.proj.bias",
        "backbone.blocks.1.ls1.gamma",
        "backbone.blocks.1.mlp.fc2.weight",
        "backbone.norm.weight",
        "backbone.mri_seq_embed.weight",
    } <= keys
    assert state["teacher"]["backbone.blocks.0.attn.qkv.weight"].shape == (3 * TINY.dim, TINY.dim)
    assert len(keys) == 5 + 2 + 1 + TINY.depth * 14


def test_training_heads_are_ignored_and_block_chunks_read(tmp_path: Path) -> None:
    model = _model()
    flat = torch.load(save_training_checkpoint(model, tmp_path / "c.pth"), weights_only=True)
    teacher = {
        k.replace("backbone.blocks.1.", "backbone.blocks.0.1."): v
        for k, v in flat["teacher"].items()
    }  # FSDP chunk 0 holding block 1
    teacher["dino_head.mlp.0.weight"] = torch.zeros(2, 2)
    teacher["ibot_head.last_layer.weight_g"] = torch.zeros(2, 1)
    _assert_same_model(load_training_checkpoint({"teacher": teacher}, arch_cfg=TINY), model)


def test_converted_directory_is_a_hugging_face_dinov2_checkpoint(tmp_path: Path) -> None:
    model = _model()
    out = convert(
        save_training_checkpoint(model, tmp_path / "c.pth"), tmp_path / "conv", arch_cfg=TINY
    )
    model.backbone.save_pretrained(tmp_path / "hf")
    ours, theirs = (
        load_file(out / "model.safetensors"),
        load_file(tmp_path / "hf" / "model.safetensors"),
    )
    assert ours.keys() - theirs.keys() == {"sequence_embedding"}
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    plain = AutoModel.from_pretrained(out)  # the backbone alone loads with transformers
    assert all(
        torch.equal(plain.state_dict()[k], v) for k, v in model.backbone.state_dict().items()
    )


@pytest.mark.parametrize(
    ("edit", "arch", "named"),
    [
        ("drop", TINY, "backbone.blocks.1.mlp.fc1.weight"),
        ("drop", TINY, "backbone.mri_seq_embed.weight"),
        ("add", TINY, "backbone.blocks.0.attn.rope.weight"),
        ("none", TINY_REG, "backbone.register_tokens"),
        ("none", dataclasses.replace(TINY, depth=3), "backbone.blocks.2.attn.proj.bias"),
    ],
    ids=["missing-weight", "missing-sequence-embedding", "extra-key", "registers", "depth"],
)
def test_a_checkpoint_that_does_not_fit_fails_naming_the_key(
    tmp_path: Path, edit: str, arch: ModelCfg, named: str
) -> None:
    state = torch.load(save_training_checkpoint(_model(), tmp_path / "c.pth"), weights_only=True)
    if edit == "drop":
        del state["teacher"][named]
    elif edit == "add":
        state["teacher"][named] = torch.zeros(1)
    with pytest.raises(ModelError, match=named.replace(".", r"\.")):
        load_training_checkpoint(state, arch_cfg=arch)


def test_a_converted_directory_with_a_stray_or_missing_tensor_fails(tmp_path: Path) -> None:
    out = convert(
        save_training_checkpoint(_model(), tmp_path / "c.pth"), tmp_path / "conv", arch_cfg=TINY
    )
    weights = load_file(out / "model.safetensors")
    weights["extra.weight"] = torch.zeros(1)
    del weights["layernorm.bias"]
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"missing: layernorm\.bias.*unexpected: extra\.weight"):
        load_converted(out)
    _model().backbone.save_pretrained(tmp_path / "plain")
    with pytest.raises(ModelError, match="not an MM-DINOv2 directory"):
        load_converted(tmp_path / "plain")


def test_unused_sequence_embedding_loads_as_zero(tmp_path: Path) -> None:
    ckpt = save_training_checkpoint(_model(), tmp_path / "c.pth")
    model = load_training_checkpoint(ckpt, arch_cfg=TINY, use_sequence_embedding=False)
    assert not model.sequence_embedding.any()
