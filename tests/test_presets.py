"""The papers' preprocessing as named presets, each checked against the reference code's
operations written out here in plain numpy and torch (never through radcache's helpers):
Baharoon et al.'s clamp or per-slice percentiles, bicubic ``Resize((s, s))`` on tensors
without antialiasing, ``CenterCrop``, ``RescaleImage``, ImageNet mean/std; Scholz et al.'s
percentile scaling over the crop, antialiased stretch, min–max and nonzero normalisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from fastapi.testclient import TestClient

from radcache.embeddings import PRESETS, Recipe, Volume, VolumeMeta, get_preset, open_store, prepare
from radcache.embeddings.errors import InvalidFieldError, RecipeError
from radcache.embeddings.models import get_cfg
from radcache.embeddings.preprocess import placement
from radcache.embeddings.recipe import Clip, MinMax, Resize, Roi, SlicePercentile
from radcache.service.cli import main
from tests.dicomgen import phantom, write_nifti, write_series
from tests.test_service import _files, _wait, client  # noqa: F401  (the app fixture)

TINY = get_cfg("dinov2-tiny-random")
IMAGENET = (
    torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
    torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
)
SCHOLZ = (torch.tensor(0.45), torch.tensor(0.225))


def _volume(
    vox: np.ndarray,
    modality: str,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Volume:
    """An axial volume: array axes (slice, row, column) along z, y, x; ``spacing`` is
    (column, row, slice) in mm."""
    meta = VolumeMeta(source_format="nifti", study="s", series="s", modality=modality)
    sp = np.asarray(spacing[::-1])
    return Volume.from_array(vox.astype(np.float32), np.eye(3)[::-1], sp, np.asarray(origin), meta)


def _reference(
    slices: np.ndarray,
    *,
    resize: int,
    crop: int,
    antialias: bool,
    norm: tuple[torch.Tensor, torch.Tensor],
    nonzero: bool = False,
) -> torch.Tensor:
    """The evaluation transform as the reference runs it on (n, rows, cols) float slices:
    grey stacked to 3 channels, Resize((s, s), BICUBIC) on a tensor, CenterCrop (offset
    round((s - c) / 2), half to even), RescaleImage (per-channel min–max), then mean/std;
    MONAI's nonzero variant leaves exact zeros alone."""
    x = torch.from_numpy(np.stack([slices] * 3, axis=1).astype(np.float32))
    x = F.interpolate(
        x, size=(resize, resize), mode="bicubic", align_corners=False, antialias=antialias
    )
    top = round((resize - crop) / 2.0)
    x = x[..., top : top + crop, top : top + crop]
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    x = (x - lo) / (hi - lo)
    mean, std = norm
    return torch.where(x != 0, (x - mean) / std, x) if nonzero else (x - mean) / std


def test_default_recipe_hashes_are_unchanged() -> None:
    """Pinned before the presets' fields existed: left out at their defaults, they change
    neither the hash nor the stored form of a recipe that does not use them."""
    assert Recipe().resolve("CT", TINY).hash() == "7cd06eddca870eac"
    assert Recipe().resolve("MR", TINY).hash() == "693ac1fab3947fd3"
    assert Recipe().resolve("CR", TINY).hash() == "e9220e7c6dbb2061"
    native = Recipe(resize=Resize(mode="native")).resolve("CT", get_cfg("dinov2-base"))
    assert native.hash() == "05871d284baf2f5b"
    stored = Recipe().resolve("CT", TINY).model_dump(mode="json")
    assert set(stored) == {"version", "slice_axis", "slices", "intensity", "resize", "mean", "std"}
    assert set(stored["resize"]) == {"mode", "size"}


def test_presets_are_named_and_hash_apart() -> None:
    assert set(PRESETS) == {
        "baharoon2023-knn",
        "baharoon2023-linear",
        "baharoon2023-fewshot",
        "baharoon2023-seg",
        "scholz2025",
    }
    with pytest.raises(RecipeError, match=r"baharoon2023-knn, .*scholz2025"):
        get_preset("baharoon2023")
    base = get_cfg("dinov2-base")
    h = {n: {m: p.recipe.resolve(m, base).hash() for m in ("CT", "MR")} for n, p in PRESETS.items()}
    defaults = {Recipe().resolve(m, base).hash() for m in ("CT", "MR")}
    assert not defaults & {x for v in h.values() for x in v.values()}
    assert h["baharoon2023-linear"] == h["baharoon2023-fewshot"]  # one preprocessing, one entry
    baharoon = ("baharoon2023-knn", "baharoon2023-linear", "baharoon2023-seg")
    distinct = [h[n][m] for n in baharoon for m in ("CT", "MR")] + [h["scholz2025"]["MR"]]
    assert len(set(distinct)) == len(distinct)
    assert len({p.recipe for p in PRESETS.values()}) == 4  # hashable; linear is fewshot's
    for p in PRESETS.values():
        assert p.probe in ("knn", "linear", "fewshot", "seg") and p.method and p.caveats
        assert not p.recipe.is_resolved and p.reference.startswith("github.com/")
    ct = get_preset("baharoon2023-knn").recipe.resolve("CT", base)
    assert ct.per_modality is None and isinstance(ct.intensity, Clip)  # resolved: concrete
    rgb = get_preset("baharoon2023-knn").recipe.resolve("CT", base, photometric="RGB")
    assert isinstance(rgb.intensity, MinMax)


def test_baharoon_ct_is_clamped_stretched_cropped_and_rescaled_as_the_reference() -> None:
    hu = np.array(
        [
            [[-3000, -1024, -500, 0, 600, 2000]] * 6,
            np.linspace(-1500, 1500, 36).reshape(6, 6),
        ]
    )
    prep = prepare(_volume(hu, "CT"), get_preset("baharoon2023-knn").recipe, TINY)
    out = prep.batch(0, 2)
    want = _reference(np.clip(hu, -1024, 600), resize=256, crop=224, antialias=False, norm=IMAGENET)
    assert out.shape == (2, 3, 224, 224)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    place = prep.placement()
    assert (place.nr, place.top, place.left) == (256, -16, -16) and bool(place.valid().all())
    # with antialiasing (PIL's cubic) the values differ: the reference has none on tensors
    aa = _reference(np.clip(hu, -1024, 600), resize=256, crop=224, antialias=True, norm=IMAGENET)
    assert (out - aa).abs().max() > 1e-3
    # the clamp: anything below -1024 (above 600) HU is -1024 (600)
    clamped = prepare(_volume(np.clip(hu, -1024, 600), "CT"), prep.recipe, TINY).batch(0, 2)
    assert torch.equal(clamped, out)


def test_baharoon_mr_per_slice_percentiles_as_the_reference() -> None:
    rng = np.random.default_rng(3)
    mr = rng.uniform(0, 1000, size=(2, 6, 6))
    mr[0, :2] = 0.0  # background
    mr[1] *= 3  # another slice, other percentiles
    lo, hi = (np.percentile(mr, q, axis=(1, 2), keepdims=True) for q in (5, 95))
    classify = np.minimum(mr, hi)  # brain_tumor.py: above p95 → p95, at or below p5 → 0
    classify = np.where(classify <= lo, 0.0, classify)
    segment = np.clip(mr, lo, hi)  # msd_heart.py, msd_hipp.py
    for name, expected, side in [
        ("baharoon2023-linear", classify, 224),
        ("baharoon2023-seg", segment, 448),
    ]:
        out = prepare(_volume(mr, "MR"), get_preset(name).recipe, TINY).batch(0, 2)
        want = _reference(expected, resize=side, crop=side, antialias=False, norm=IMAGENET)
        torch.testing.assert_close(out, want, atol=2e-4, rtol=0, msg=name)


def test_slice_percentiles_worked_by_hand() -> None:
    """A 14 × 14 ramp 0…195 at its own size (the resize is the identity): the 5th and 95th
    percentiles are 9.75 and 185.25 (linear interpolation between ranks)."""
    ramp = np.arange(196, dtype=np.float64).reshape(1, 14, 14)
    same = Resize(mode="stretch", size=14, interp="bicubic", antialias=False)
    unit = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "resize": same, "rescale": "minmax"}
    zero = Recipe(intensity=SlicePercentile(below="zero"), **unit)
    x = prepare(_volume(ramp, "MR"), zero, TINY).batch(0, 1)[0, 0].reshape(-1)
    assert torch.all(x[:10] == 0) and x[10].item() == pytest.approx(10 / 185.25)
    assert x[100].item() == pytest.approx(100 / 185.25) and torch.all(x[186:] == 1)
    clip = Recipe(intensity=SlicePercentile(scale=True), **{**unit, "rescale": "none"})
    y = prepare(_volume(ramp, "MR"), clip, TINY).batch(0, 1)[0, 0].reshape(-1)
    assert y[0].item() == 0 and y[100].item() == pytest.approx((100 - 9.75) / 175.5)
    assert y[195].item() == pytest.approx(1.0)


def test_scholz_scaling_stretch_and_nonzero_normalisation_as_the_reference() -> None:
    rng = np.random.default_rng(5)
    mr = np.zeros((1, 6, 6))
    mr[0, 1:5, 1:5] = rng.uniform(100, 900, size=(4, 4))
    p1, p99 = np.percentile(mr[0], [1, 99])
    scaled = np.clip((mr - p1) / (p99 - p1), 0, 1)  # ScaleIntensityRangePercentiles(clip)
    out = prepare(_volume(mr, "MR"), get_preset("scholz2025").recipe, TINY).batch(0, 1)
    want = _reference(scaled, resize=224, crop=224, antialias=True, norm=SCHOLZ, nonzero=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    assert torch.equal(out == 0, want == 0) and int((out == 0).sum()) > 0


def test_nonzero_normalisation_worked_by_hand() -> None:
    img = np.zeros((1, 14, 14))
    img[0, 4:10, 4:7], img[0, 4:10, 7:10] = 50.0, 100.0  # after min–max: 0, 0.5, 1
    r = Recipe(
        intensity=MinMax(),
        resize=Resize(mode="stretch", size=14, interp="bicubic", antialias=False),
        rescale="minmax",
        normalize="nonzero",
        mean=(0.45, 0.45, 0.45),
        std=(0.225, 0.225, 0.225),
    )
    x = prepare(_volume(img, "MR"), r, TINY).batch(0, 1)[0]
    assert torch.all(x[:, 0, :] == 0)  # background exactly 0, not -0.45 / 0.225
    assert x[0, 5, 5].item() == pytest.approx(0.05 / 0.225)
    assert x[2, 5, 8].item() == pytest.approx(0.55 / 0.225)


def test_roi_by_voxels_and_by_millimetres() -> None:
    vox = np.arange(4 * 8 * 10, dtype=np.float64).reshape(4, 8, 10)
    vol = _volume(vox, "MR", spacing=(0.5, 0.8, 2.0), origin=(10.0, -20.0, 30.0))
    scholz = get_preset("scholz2025").recipe
    by_voxels = scholz.with_roi(Roi(voxels=(1, 3, 2, 6, 3, 8)))
    prep = prepare(vol, by_voxels, TINY)
    np.testing.assert_array_equal(prep.volume.voxels, vox[1:3, 2:6, 3:8])
    np.testing.assert_allclose(prep.volume.geometry.positions[0], (11.5, -18.4, 32.0))
    np.testing.assert_allclose(prep.volume.geometry.origin, (11.5, -18.4, 32.0))
    # voxel centres: columns 10 + 0.5 i, rows -20 + 0.8 j, slices 30 + 2 k
    by_mm = scholz.with_roi(Roi(mm=(11.3, 13.7, -18.6, -15.8, 31.5, 34.5)))
    mm = prepare(vol, by_mm, TINY)
    np.testing.assert_array_equal(mm.volume.voxels, vox[1:3, 2:6, 3:8])
    # the percentiles are the crop's: the same as embedding the cropped array alone
    alone = prepare(_volume(vox[1:3, 2:6, 3:8], "MR"), scholz, TINY).batch(0, 2)
    torch.testing.assert_close(prep.batch(0, 2), alone, atol=0, rtol=0)
    assert by_voxels.resolve("MR", TINY).hash() != scholz.resolve("MR", TINY).hash()
    with pytest.raises(InvalidFieldError, match="holds no voxel"):
        prepare(vol, scholz.with_roi(Roi(voxels=(5, 6, 0, 8, 0, 10))), TINY)
    with pytest.raises(ValueError, match="exactly one of voxels or mm"):
        Roi(voxels=(0, 1, 0, 1, 0, 1), mm=(0, 1, 0, 1, 0, 1))


def test_stretch_then_crop_placement_maps_masks_and_images() -> None:
    r = Resize(mode="stretch", size=224, stretch_to=256, interp="bicubic", antialias=False)
    place = placement(r, 150, 200, (0.7, 0.7))
    assert (place.nr, place.nc, place.top, place.left) == (256, 256, -16, -16)
    assert bool(place.valid().all())
    odd = placement(r.model_copy(update={"stretch_to": 257}), 150, 200, (0.7, 0.7))
    assert odd.top == -16  # torchvision's CenterCrop: int(round(16.5)) == 16
    img = torch.rand(1, 1, 150, 200)
    direct = F.interpolate(img, size=(256, 256), mode="bicubic", align_corners=False)
    assert torch.equal(place.to_canvas(img), direct[..., 16:240, 16:240])
    labels = torch.zeros(150, 200, dtype=torch.long)
    labels[40:110, 50:150] = 1
    onehot = F.one_hot(labels, 2).permute(2, 0, 1)[None].float()
    back = place.from_canvas(place.to_canvas(onehot, interp="bilinear")).argmax(dim=1)[0]
    assert torch.equal(back[20:130, 20:180], labels[20:130, 20:180])  # inside the crop


def test_embed_protocol_flag(tmp_path: Path) -> None:
    ct = write_nifti(tmp_path / "ct.nii.gz", phantom(3, 12, 12).astype(np.float32))
    store = str(tmp_path / "s.zarr")
    base = ["embed", str(ct), "--model", "dinov2-tiny-random", "--store", store, "--json"]
    runner = CliRunner()
    ok = runner.invoke(main, [*base, "--modality", "CT", "--protocol", "baharoon2023-knn"])
    assert ok.exit_code == 0, ok.output
    (entry,) = open_store(store).series()
    want = get_preset("baharoon2023-knn").recipe.resolve("CT", TINY)
    assert entry.recipe_hash == want.hash() and entry.attrs["recipe"]["resize"]["stretch_to"] == 256
    roi = json.dumps({"voxels": [0, 2, 2, 10, 2, 10]})
    boxed = runner.invoke(
        main, [*base, "--modality", "CT", "--protocol", "scholz2025", "--roi", roi]
    )
    assert boxed.exit_code == 0, boxed.output
    cut = [e for e in open_store(store).series() if e.attrs["recipe"].get("roi")]
    assert [e.n_slices for e in cut] == [2]
    other = json.dumps({"voxels": [1, 3, 0, 8, 0, 8]})  # another box: its own entry, one space
    again = runner.invoke(
        main, [*base, "--modality", "CT", "--protocol", "scholz2025", "--roi", other]
    )
    assert again.exit_code == 0, again.output
    boxes = [e for e in open_store(store).series() if e.attrs["recipe"].get("roi")]
    assert len({e.key for e in boxes}) == 2 and len({e.recipe_hash for e in boxes}) == 2
    assert len({e.space for e in boxes}) == 1
    recipe = tmp_path / "r.json"
    recipe.write_text("{}")
    for extra, message in [
        (["--recipe", str(recipe), "--protocol", "scholz2025"], "given together"),
        (["--protocol", "nope"], "baharoon2023-knn, baharoon2023-linear"),
        (["--roi", '{"voxels": [1, 0, 0, 1, 0, 1]}'], "low to high"),
    ]:
        bad = runner.invoke(main, [*base, *extra])
        assert bad.exit_code == 2, bad.output
        (error,) = json.loads(bad.stdout)["errors"]
        assert error["code"] == "invalid-recipe" and message in error["message"], error


def test_api_protocol_field(client: TestClient, tmp_path: Path) -> None:  # noqa: F811
    gen = write_series(tmp_path / "p", phantom(2, 16, 16, seed=91))
    sent = client.post(
        "/v1/studies",
        files=_files(gen.directory),
        data={"protocol": "baharoon2023-seg", "roi": json.dumps({"voxels": [0, 1, 0, 16, 0, 16]})},
    )
    job = _wait(client, sent.headers["location"])
    assert job["state"] == "done", job
    meta = client.get(f"/v1/series/{job['series'][0]['entry']}").json()
    assert meta["recipe"]["resize"]["size"] == 448 and meta["recipe"]["intensity"]["kind"] == "clip"
    assert meta["recipe"]["roi"]["voxels"] == [0, 1, 0, 16, 0, 16] and meta["slices"] == 1
    assert meta["recipe_hash"] == (
        get_preset("baharoon2023-seg")
        .recipe.with_roi(Roi(voxels=(0, 1, 0, 16, 0, 16)))
        .resolve("CT", TINY)
        .hash()
    )
    for data, query in [
        ({"protocol": "scholz2025", "recipe": json.dumps({"slice_axis": "axial"})}, {}),
        ({"recipe": json.dumps({"resize": {"mode": "pad"}})}, {"protocol": "scholz2025"}),
        ({"protocol": "no-such-paper"}, {}),
    ]:
        r = client.post("/v1/studies", files=_files(gen.directory), data=data, params=query)
        assert (r.status_code, r.json()["code"]) == (422, "invalid-recipe"), r.json()
