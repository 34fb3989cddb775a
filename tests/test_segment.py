"""Segmentation probes: masks follow the image through reslicing and the recipe's resize and
padding; a linear head on patch tokens learns a phantom's structures; datasets for PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer
from radcache.embeddings.encode import Encoder
from radcache.embeddings.errors import InputError
from radcache.embeddings.preprocess import placement
from radcache.embeddings.probes import (
    PatchDataset,
    SliceDataset,
    dice,
    features,
    seg,
    seg_data,
    split_slices,
)
from radcache.embeddings.recipe import Resize

SHAPE = (80, 96, 24)  # i (x), j (y), k (z) as NIfTI stores it: non-square slices


def phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A body with a bright sphere-ish blob (label 1) and a dimmer bar (label 2)."""
    rng = np.random.default_rng(seed)
    i, j, k = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1], 0 : SHAPE[2]].astype(np.float32)
    body = ((i - 40) / 36) ** 2 + ((j - 48) / 44) ** 2 <= 1
    cx, cy = rng.uniform(28, 52), rng.uniform(30, 44)
    r = 10 + 6 * np.sin(np.pi * k / SHAPE[2])
    blob = (i - cx) ** 2 + (j - cy) ** 2 <= r**2
    bar = (np.abs(j - rng.uniform(62, 70)) < 5) & (np.abs(i - 40) < 22) & body
    img = np.where(body, 100.0, 0.0) + np.where(blob, 300.0, 0.0) + np.where(bar & ~blob, 120.0, 0)
    img += rng.normal(0, 8, img.shape)
    mask = np.zeros(SHAPE, np.int16)
    mask[bar & ~blob] = 2
    mask[blob & body] = 1
    return img.astype(np.float32), mask


AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


@pytest.fixture(scope="module")
def seg_store(
    tmp_path_factory: pytest.TempPathFactory, tiny_fp32: Encoder, pseudo: Pseudonymizer
) -> tuple[EmbeddingStore, dict[str, Path], dict[str, Path]]:
    tmp = tmp_path_factory.mktemp("seg")
    store = EmbeddingStore(tmp / "store.zarr")
    pipe = Pipeline(tiny_fp32, store, pseudo, patch_tokens=True)
    masks, images = {}, {}
    for n in range(4):
        img, mask = phantom(n)
        ip, mp = tmp / f"img{n}.nii.gz", tmp / f"mask{n}.nii.gz"
        nib.save(nib.Nifti1Image(img, AFFINE), ip)
        nib.save(nib.Nifti1Image(mask, AFFINE), mp)
        (res,) = pipe.embed([ip]).series
        masks[res.entry], images[res.entry] = mp, ip
    return store, masks, images


@pytest.mark.parametrize("mode", ["pad", "stretch", "native"])
def test_a_mask_goes_to_the_canvas_and_back_unchanged(mode: str) -> None:
    rng = np.random.default_rng(1)
    rows, cols = 150, 200
    labels = np.zeros((rows, cols), np.int64)
    labels[30:110, 40:120] = 1
    labels[60:140, 130:190] = 2
    labels[rng.integers(0, rows, 50), rng.integers(0, cols, 50)] = 0
    place = placement(Resize(mode=mode, size=224), rows, cols, (0.7, 0.7))
    onehot = torch.nn.functional.one_hot(torch.from_numpy(labels), 3).permute(2, 0, 1)[None]
    canvas = place.to_canvas(onehot.float())
    assert canvas.shape == (1, 3, 224, 224)
    inside = place.valid()
    assert torch.allclose(canvas[0].sum(dim=0)[inside], torch.ones(()), atol=1e-4)
    if mode == "pad":
        assert not canvas[0][:, ~inside].any()  # padding holds no class
        assert int(inside.sum()) == place.nr * place.nc
    back = place.from_canvas(canvas).argmax(dim=1)[0].numpy()
    lost = 0.25 if mode == "native" else 0.0  # the centre crop cuts a quarter away
    kept = dice(back, labels, 3)
    assert kept[1] > 0.97 - lost and kept[2] > 0.95 - lost, kept


def test_dice_is_the_overlap_formula() -> None:
    ref = np.array([[0, 1, 1], [2, 2, 0]])
    pred = np.array([[0, 1, 0], [2, 2, 2]])
    d = dice(pred, ref, 4)
    assert d[1] == pytest.approx(2 * 1 / 3) and d[2] == pytest.approx(2 * 2 / 5)
    assert np.isnan(d[3])


def test_the_probe_learns_the_phantoms_structures(seg_store) -> None:
    store, masks, images = seg_store
    data = seg_data(store, masks, classes=["background", "blob", "bar"], images=images)
    vol = data.volumes[0]
    assert vol.tokens.shape[1:] == (8, 8, 64) and vol.masks.shape == (24, 96, 80)
    # The mask followed the image into radcache's orientation: the bright blob is label 1.
    assert vol.image is not None and vol.image[vol.masks == 1].mean() > 300
    targets = vol.grid_targets(3)
    assert targets.shape == (24, 3, 8, 8)
    split = split_slices(data, "blocks", blocks=6)
    res, head = seg(data, split, bootstrap=200)
    assert res["n_train_slices"] + res["n_test_slices"] == 4 * 24
    assert res["loss_curve"][-1] < 0.5 * res["loss_curve"][0]
    assert res["dice_2d"]["blob"]["low"] > 0.85, res["dice_2d"]
    assert res["dice_3d"]["blob"]["value"] > 0.85, res["dice_3d"]
    assert res["dice_3d"]["bar"]["value"] > 0.7, res["dice_3d"]
    # The same seed gives the same figures.
    again, _ = seg(data, split, bootstrap=200)
    assert again["dice_3d"] == res["dice_3d"]
    pred = head.predict(vol, np.arange(24))
    assert pred.shape == vol.masks.shape


def test_masks_on_another_grid_are_refused_by_name(seg_store, tmp_path: Path) -> None:
    store, masks, _ = seg_store
    key = next(iter(masks))
    bad = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((80, 90, 24), np.int16), AFFINE), bad)
    with pytest.raises(InputError, match=r"wrong\.nii\.gz.*shape"):
        seg_data(store, {key: bad})
    moved = tmp_path / "moved.nii.gz"
    shifted = AFFINE.copy()
    shifted[2, 3] = 10.0
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), shifted), moved)
    with pytest.raises(InputError, match=r"moved\.nii\.gz.*mm away"):
        seg_data(store, {key: moved})


def test_datasets_feed_a_torch_dataloader(seg_store) -> None:
    store, masks, _ = seg_store
    data = seg_data(store, masks)
    assert data.classes == ["background", "class 1", "class 2"]
    batch = next(iter(torch.utils.data.DataLoader(PatchDataset(data), batch_size=5)))
    assert batch["tokens"].shape == (5, 64, 8, 8) and batch["target"].shape == (5, 3, 8, 8)
    assert torch.allclose(batch["target"].sum(dim=1).amax(), torch.ones(()), atol=1e-4)
    f = features(store, level="slice", kind="cls")
    labels = {r["entry"]: {"phantom": r["entry"][:4]} for r in f.rows}
    for r in f.rows:
        r["labels"] = labels[r["entry"]]
    ds = SliceDataset(f, "phantom")
    assert len(ds) == 4 * 24 and len(ds.classes) == 4
    item = ds[5]
    assert item["x"].shape == (64,) and item["y"].dtype == torch.long and item["slice"] == 5


def test_probe_seg_command_writes_a_report(seg_store, tmp_path: Path) -> None:
    from tests.test_cli import run

    store, masks, images = seg_store
    csv = tmp_path / "masks.csv"
    lines = ["entry,mask,image"] + [f"{k},{masks[k]},{images[k]}" for k in masks]
    csv.write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"
    p = run(
        "probe", "seg", "--store", store.url, "--masks", str(csv), "--classes", "bg,blob,bar",
        "--split", "blocks", "--blocks", "6", "--epochs", "30", "--bootstrap", "50",
        "--pictures", "2", "-o", str(out), "--json",
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res["protocol"] == "seg" and set(res["dice_3d"]) == {"blob", "bar"}
    assert json.loads((out / "result.json").read_text())["dice_2d"] == res["dice_2d"]
    md = (out / "report.md").read_text()
    assert "| blob |" in md and "overlay_1.png" in md
    for name in ("dice.png", "loss.png", "overlay_0.png", "overlay_1.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "bad.csv"
    bad.write_text(f"entry,mask\n{next(iter(masks))},{tmp_path / 'missing.nii.gz'}\n")
    p = run("probe", "seg", "--store", store.url, "--masks", str(bad), "-o", str(out))
    assert p.returncode != 0 and "missing.nii.gz" in p.stderr


def test_probe_seg_protocol_baharoon2023_chooses_on_val(
    seg_store: tuple[EmbeddingStore, dict[str, Path], dict[str, Path]], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from radcache.service.cli import main

    store, masks, _ = seg_store
    csv = tmp_path / "masks.csv"
    csv.write_text("entry,mask\n" + "".join(f"{k},{masks[k]}\n" for k in masks))
    out = tmp_path / "report"
    r = CliRunner().invoke(
        main,
        [
            "probe", "seg", "--store", store.url, "--masks", str(csv), "--classes", "bg,blob,bar",
            "--protocol", "baharoon2023-seg", "--split", "blocks", "--epochs", "3",
            "--bootstrap", "20", "--pictures", "0", "-o", str(out), "--json",
        ],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["method"] == "baharoon2023" and res["preset"] == "baharoon2023-seg"
    assert res["n_val_slices"] > 0 and res["trained_on"] == "train+val"
    assert len(res["val_dice"]) == 7 and res["lr"] == max(
        (float(k) for k in res["val_dice"]), key=lambda k: res["val_dice"][f"{k:g}"]
    )
    assert res["dice"]["value"] > 0.5, res["dice"]  # the blob and bar, pooled on the canvas
    assert any("448" in w for w in res["warnings"])  # embedded with radcache's recipe
    md = (out / "report.md").read_text()
    assert "validation Dice" in md and "augmentation is not reproduced" in md
