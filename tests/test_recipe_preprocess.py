"""Recipes are data with stable hashes; preprocessing does what the recipe says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from radcache.embeddings import Recipe, Volume, VolumeMeta, load_recipe, prepare
from radcache.embeddings.errors import RecipeError
from radcache.embeddings.models import get_cfg
from radcache.embeddings.preprocess import reslice, select_slices
from radcache.embeddings.recipe import CTWindows, MinMax, Percentile, SliceSelection, VoiMinMax

TINY = get_cfg("dinov2-tiny-random")


def _volume(
    vox: np.ndarray, modality: str | None = "CT", spacing=(1.0, 1.0, 1.0), **meta
) -> Volume:
    dirs = np.eye(3)[::-1]  # (slice, row, column) along z, y, x
    sp = np.asarray([spacing[2], spacing[1], spacing[0]])
    m = VolumeMeta(source_format="nifti", study="s", series="s", modality=modality, **meta)
    return Volume.from_array(vox.astype(np.float32), dirs, sp, np.zeros(3), m)


def test_defaults_per_modality() -> None:
    r = Recipe()
    assert isinstance(r.resolve("CT", TINY).intensity, CTWindows)
    assert isinstance(r.resolve("MR", TINY).intensity, Percentile)
    for m in ("CR", "DX", "MG"):
        assert isinstance(r.resolve(m, TINY).intensity, VoiMinMax)
    assert isinstance(r.resolve(None, TINY).intensity, Percentile)
    assert isinstance(r.resolve("US", TINY, photometric="RGB").intensity, MinMax)
    resolved = r.resolve("CT", TINY)
    assert resolved.resize.size == TINY.image_size and resolved.mean == TINY.mean


def test_hash_is_stable_and_sensitive() -> None:
    a = Recipe().resolve("CT", TINY)
    b = Recipe.model_validate_json(a.canonical_json())
    assert a.hash() == b.hash() and len(a.hash()) == 16
    lung = Recipe(intensity=CTWindows(windows=((-600, 1500),))).resolve("CT", TINY)
    assert lung.hash() != a.hash()
    assert Recipe().resolve("MR", TINY).hash() != a.hash()
    assert (
        Recipe(slices=SliceSelection(mode="stride", step=2)).resolve("CT", TINY).hash() != a.hash()
    )
    with pytest.raises(RecipeError, match="resolve"):
        Recipe().hash()


def test_recipe_files_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "r.json"
    p.write_text(
        json.dumps(
            {"intensity": {"kind": "ct-windows", "windows": [[-600, 1500], [40, 400], [400, 1800]]}}
        )
    )
    r = load_recipe(p)
    assert isinstance(r.intensity, CTWindows) and len(r.intensity.windows) == 3
    y = tmp_path / "r.yaml"
    y.write_text("slice_axis: coronal\nresize: {mode: stretch}\n")
    assert load_recipe(y).slice_axis == "coronal"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"intensity": {"kind": "ct-windows", "windows": [[0, 1], [0, 1]]}}))
    with pytest.raises(RecipeError, match="1 or 3 windows"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="multiple of the model's patch size"):
        Recipe.model_validate({"resize": {"size": 100}}).resolve("CT", TINY)


def test_ct_window_and_normalisation() -> None:
    hu = np.full((1, 28, 28), -1000.0)
    hu[0, :, 14:] = 240.0  # above the soft-tissue window (40 ± 200) → 1
    prep = prepare(_volume(hu), Recipe(resize={"mode": "stretch", "size": 28}), TINY)
    x = prep.batch(0, 1)
    assert x.shape == (1, 3, 28, 28)
    mean, std = torch.tensor(TINY.mean).view(3, 1, 1), torch.tensor(TINY.std).view(3, 1, 1)
    unnorm = x[0] * std + mean
    assert torch.allclose(unnorm[:, :, :12], torch.zeros(3, 28, 12), atol=1e-5)
    assert torch.allclose(unnorm[:, :, 16:], torch.ones(3, 28, 12), atol=1e-5)


def test_three_windows_make_three_channels() -> None:
    hu = np.full((1, 14, 14), 100.0)
    r = Recipe(
        intensity=CTWindows(windows=((-600, 1500), (40, 400), (400, 1800))),
        resize={"mode": "stretch", "size": 14},
    )
    x = prepare(_volume(hu), r, TINY).batch(0, 1)[0]
    unnorm = x * torch.tensor(TINY.std).view(3, 1, 1) + torch.tensor(TINY.mean).view(3, 1, 1)
    expected = [(100 + 600 + 750) / 1500, (100 - 40 + 200) / 400, (100 - 400 + 900) / 1800]
    assert torch.allclose(unnorm[:, 0, 0], torch.tensor(expected), atol=1e-5)


def test_percentile_clipping_uses_the_foreground() -> None:
    rng = np.random.default_rng(0)
    vox = np.zeros((4, 28, 28))
    vox[:, 7:21, 7:21] = rng.uniform(100, 200, size=(4, 14, 14))
    vox[0, 10, 10] = 10_000  # one hot voxel must not set the scale
    prep = prepare(
        _volume(vox, modality="MR"), Recipe(resize={"mode": "stretch", "size": 28}), TINY
    )
    lo, hi = prep._range  # type: ignore[misc]
    assert 100 <= lo < 102 and 198 < hi <= 200


def test_pad_keeps_physical_aspect() -> None:
    vox = np.full((1, 20, 40), 240.0)  # 20 rows × 40 columns of 1 mm: twice as wide as tall
    r = Recipe(resize={"mode": "pad", "size": 56})  # CT soft-tissue window: 240 HU → 1
    x = prepare(_volume(vox), r, TINY).batch(0, 1)[0, 0]
    zero = (0 - TINY.mean[0]) / TINY.std[0]
    content_rows = (~torch.isclose(x, torch.tensor(zero))).any(dim=1).sum().item()
    assert content_rows == 28  # 56 wide, 28 tall, padded above and below
    aniso = prepare(_volume(np.full((1, 40, 40), 240.0), spacing=(1.0, 0.5, 1.0)), r, TINY)
    y = aniso.batch(0, 1)[0, 0]
    assert (~torch.isclose(y, torch.tensor(zero))).any(dim=1).sum().item() == 28


def test_slice_selection() -> None:
    assert select_slices(10, SliceSelection()).tolist() == list(range(10))
    assert select_slices(10, SliceSelection(mode="stride", step=3)).tolist() == [0, 3, 6, 9]
    assert select_slices(10, SliceSelection(mode="count", count=3)).tolist() == [0, 4, 9]
    assert select_slices(2, SliceSelection(mode="count", count=5)).tolist() == [0, 1]


def test_reslice_and_batches_match_whole() -> None:
    rng = np.random.default_rng(1)
    vox = rng.normal(size=(6, 10, 12))
    vol = _volume(vox, modality="MR", spacing=(0.5, 0.5, 2.0))
    cor = reslice(vol, "coronal")
    assert cor.shape == (10, 6, 12)  # one slice per row; head (high z) at the top
    np.testing.assert_array_equal(cor.voxels[3], vox[::-1, 3, :].astype(np.float32))
    assert cor.geometry.spacing == (0.5, 2.0, 0.5)
    prep = prepare(vol, Recipe(slice_axis="coronal"), TINY)
    whole = prep.batch(0, prep.n)
    parts = torch.cat(list(prep.batches(3)))
    assert torch.equal(whole, parts) and whole.shape == (10, 3, TINY.image_size, TINY.image_size)
