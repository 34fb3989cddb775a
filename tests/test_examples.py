"""The worked examples in examples/ run as documented (with the labelled test model)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mni152_segmentation_example_runs_and_learns_tissue(tmp_path: Path) -> None:
    # nilearn comes with the test extra: the example is a required part, never skipped.
    example = runpy.run_path(str(ROOT / "examples" / "mni152_seg.py"))
    out = tmp_path / "mni"
    report = example["main"](
        ["--model", "dinov2-tiny-random", "--size", "112", "--stride", "3", "--epochs", "40",
         "--out", str(out)]
    )  # fmt: skip
    res = json.loads((out / "report" / "result.json").read_text())
    assert report == out / "report" / "report.md"
    assert res["classes"] == ["background", "grey-matter", "white-matter"]
    assert res["n_train_slices"] + res["n_test_slices"] == 63  # 189 axial slices, every 3rd
    assert "RANDOM-WEIGHT" in res["note"] and "RANDOM-WEIGHT" in report.read_text()
    # Even random-weight patch tokens carry where tissue is: far above an empty prediction.
    assert res["dice_3d"]["grey-matter"]["value"] > 0.4, res["dice_3d"]
    assert (out / "report" / "overlay_2.png").exists()


# -- the papers' reproduction scripts, on data cut from the MNI152 template ------------------
def _run_example(name: str, argv: list[str]) -> Path:
    main = runpy.run_path(str(ROOT / "examples" / name))["main"]
    return Path(main(argv))


@pytest.fixture(scope="module")
def mni2() -> dict[str, Any]:
    """nilearn's MNI152 T1 template at 2 mm (99×117×95) and its tissue label map
    (background / grey / white matter, the most probable of each voxel)."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2)
    gm = datasets.load_mni152_gm_template(resolution=2).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=2).get_fdata()
    tissue = np.stack([np.clip(1 - gm - wm, 0, 1), gm, wm]).argmax(axis=0)
    return {"t1": t1.get_fdata().astype(np.float32), "tissue": tissue, "affine": t1.affine}


def _slab(path: Path, voxels: np.ndarray, affine: np.ndarray, z0: int, step: int = 1) -> Path:
    """Axial slices ``z0``… of ``voxels`` (every ``step``-th voxel in plane) as NIfTI, placed
    where they lie in the template."""
    import nibabel as nib

    moved = affine @ np.diag([step, step, 1.0, 1.0])
    moved[:3, 3] = (affine @ [0, 0, z0, 1])[:3]
    nib.save(nib.Nifti1Image(voxels[::step, ::step], moved), path)
    return path


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


SPLIT_CYCLE = ("train", "train", "val", "test")


def _classification_set(root: Path, mni: dict[str, Any], flip_test: bool = False) -> Path:
    """24 two-slice axial slabs, labelled by where they lie (inferior or superior brain),
    split train, train, val, test in turn, so each split holds both classes."""
    rows = []
    for i in range(24):
        z0 = 20 + 60 * i // 24
        name = f"slab{i:02d}.nii.gz"
        if not (root / name).exists():
            _slab(root / name, mni["t1"][:, :, z0 : z0 + 2], mni["affine"], z0, step=2)
        label = "superior" if z0 >= 50 else "inferior"
        split = SPLIT_CYCLE[i % 4]
        if flip_test and split == "test":
            label = {"superior": "inferior", "inferior": "superior"}[label]
        rows.append(f"{name},{label},{split},p{i:02d}")
    return _csv(
        root / ("flipped.csv" if flip_test else "labels.csv"), "path,label,split,patient", rows
    )


def _with_intervals(cell: dict[str, float]) -> bool:
    return all(np.isfinite(cell[b]) for b in ("value", "low", "high")) and (
        cell["low"] <= cell["value"] <= cell["high"]
    )


def test_reproduce_baharoon2023_linear_chooses_on_val_and_caches(
    tmp_path: Path, mni2: dict[str, Any]
) -> None:
    data = tmp_path / "slabs"
    data.mkdir()
    base = ["--protocol", "baharoon2023-linear", "--model", "dinov2-tiny-random"]
    base += ["--modality", "MR", "--out", str(tmp_path / "out"), "--bootstrap", "200"]
    report = _run_example(
        "reproduce_baharoon2023.py", [str(data), str(_classification_set(data, mni2)), *base]
    )
    res = json.loads((report.parent / "result.json").read_text())
    assert res["preset"] == "baharoon2023-linear" and res["method"] == "baharoon2023"
    assert (res["n_train"], res["n_val"], res["n_test"]) == (12, 6, 6)
    assert res["cache"] == {"hit": 0, "miss": 24}
    for metric in ("accuracy", "macro_auroc"):
        assert _with_intervals(res["test"][metric]), res["test"][metric]
    text = report.read_text()
    assert "RANDOM-WEIGHT" in res["note"] and "RANDOM-WEIGHT" in text.split("\n\n")[1]
    assert "dinov2-tiny-random (RANDOM WEIGHTS) |" in text  # the paper-layout table's row
    # The setting is the first best of the validation grid; the test labels play no part:
    # with every test label flipped, the same setting is chosen and the test figure mirrors.
    grid = res["val_auroc_by_setting"]
    s = res["setting"]
    assert grid[f"blocks={s['blocks']} avgpool={s['avgpool']} lr={s['lr']:g}"] == max(grid.values())
    flipped = _classification_set(data, mni2, flip_test=True)
    again = _run_example("reproduce_baharoon2023.py", [str(data), str(flipped), *base])
    res2 = json.loads((again.parent / "result.json").read_text())
    assert res2["cache"] == {"hit": 24, "miss": 0}  # the store under --out answered
    assert res2["setting"] == s and res2["val_auroc_by_setting"] == grid
    auroc, auroc2 = res["test"]["macro_auroc"]["value"], res2["test"]["macro_auroc"]["value"]
    assert auroc2 == pytest.approx(1 - auroc)


def test_reproduce_baharoon2023_seg_on_mni152_tissue(tmp_path: Path, mni2: dict[str, Any]) -> None:
    """Four three-slice slabs of the template with their tissue maps, split train, train,
    val, test: the preset's 448-pixel stretch and the paper's learning-rate search."""
    data = tmp_path / "tissue"
    data.mkdir()
    rows = []
    for i, z0 in enumerate((30, 42, 54, 66)):
        for kind, vox in (("t1", mni2["t1"]), ("mask", mni2["tissue"].astype(np.int16))):
            _slab(data / f"{kind}{i}.nii.gz", vox[:, :, z0 : z0 + 3], mni2["affine"], z0, 2)
        rows.append(f"t1{i}.nii.gz,mask{i}.nii.gz,{SPLIT_CYCLE[i]}")
    table = _csv(data / "masks.csv", "path,mask,split", rows)
    report = _run_example(
        "reproduce_baharoon2023.py",
        [str(data), str(table), "--protocol", "baharoon2023-seg", "--model",
         "dinov2-tiny-random", "--modality", "MR", "--out", str(tmp_path / "out"),
         "--classes", "background,grey-matter,white-matter", "--bootstrap", "200"],
    )  # fmt: skip
    res = json.loads((report.parent / "result.json").read_text())
    assert res["preset"] == "baharoon2023-seg" and res["method"] == "baharoon2023"
    assert (res["n_train_slices"], res["n_val_slices"], res["n_test_slices"]) == (6, 3, 3)
    assert _with_intervals(res["dice"]), res["dice"]
    assert set(res["dice_per_class"]) == {"grey-matter", "white-matter"}
    # The rate is the validation Dice's first best; trained again on train + val for test.
    assert res["val_dice"][str(res["lr"])] == max(res["val_dice"].values())
    assert res["trained_on"] == "train+val"
    text = report.read_text()
    assert (
        "RANDOM-WEIGHT" in text
        and "tissue Dice" in text
        and (report.parent / "overlay_0.png").exists()
    )


def _glioma_like_set(root: Path, mni: dict[str, Any]) -> tuple[Path, dict[str, float]]:
    """20 studies cut from the template (8 axial slices, 2 mm), each with T1, T1c, T2 and
    FLAIR files in the reference's BIDS names and a tumour map: a blob that enhances on
    T1c and swells on FLAIR, small or large (the label), at a drawn place. Returns the CSV
    and, per study, the z (mm) of the slice with the most tumour."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    t1 = mni["t1"][:, :, 36:44]
    brain = t1 > 0.2
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in t1.shape), indexing="ij")
    affine = mni["affine"].copy()
    affine[:3, 3] = (mni["affine"] @ [0, 0, 36, 1])[:3]
    rows, tumour_z = [], {}
    for i in range(20):
        size = ("small", "large")[(i // 4) % 2]
        r = 3.0 if size == "small" else 7.0
        c = (rng.uniform(35, 64), rng.uniform(40, 77), rng.uniform(2.5, 4.5))
        d = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + ((xx - c[2]) * 2.0) ** 2)
        core, oedema = (d < r) & brain, (d < 1.8 * r) & brain
        seg = np.where(core, 1, np.where(oedema, 2, 0)).astype(np.int16)
        volumes = {
            "t1": t1,
            "t1c": t1 + 0.8 * core,
            "t2": np.where(brain, 1.0 - t1, 0.0) + 0.5 * oedema,
            "flair": 0.6 * t1 + 0.7 * oedema,
            "seg": seg,
        }
        study = root / f"sub-{i:02d}"
        (study / "preop").mkdir(parents=True)
        for name, vox in volumes.items():
            fn = study / "preop" / f"sub-{i:02d}_ses-preop_space-sri_{name}.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(vox, vox.dtype), affine), fn)
        k = int(np.argmax(seg.sum(axis=(0, 1))))
        tumour_z[f"sub-{i:02d}/preop"] = float((affine @ [0, 0, k, 1])[2])
        rows.append(f"sub-{i:02d}/preop,{size},{SPLIT_CYCLE[i % 4]},p{i:02d}")
    return _csv(root / "labels.csv", "path,label,split,patient", rows), tumour_z


# The reference chooses C by MCC on n // 10 training rows: on 10 rows, one, so scikit-learn
# warns that its confusion matrix holds a single label.
@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")
def test_reproduce_scholz2025_on_template_studies_with_tumour_boxes(
    tmp_path: Path, mni2: dict[str, Any]
) -> None:
    from radcache.embeddings import open_store

    data = tmp_path / "glioma"
    table, tumour_z = _glioma_like_set(data, mni2)
    out = tmp_path / "out"
    report = _run_example(
        "reproduce_scholz2025.py",
        [str(data), str(table), "--model", "mm-dinov2-tiny-random", "--out", str(out),
         "--bootstrap", "200"],
    )  # fmt: skip
    res = json.loads((report.parent / "result.json").read_text())
    assert res["preset"] == "scholz2025" and res["model"] == "mm-dinov2-tiny-random"
    assert (res["n_train"], res["n_val"], res["n_test"]) == (10, 5, 5)
    for metric in ("accuracy", "balanced_accuracy", "macro_auroc", "mcc", "macro_f1"):
        assert _with_intervals(res["test"][metric]), (metric, res["test"][metric])
    text = report.read_text()
    assert "RANDOM-WEIGHT" in text.split("\n\n")[1]
    assert "mm-dinov2-tiny-random (RANDOM WEIGHTS) |" in text
    # C is the first best of the reference's choice, made on a tenth of the training rows.
    grid = res["val_mcc_by_c"]
    assert grid[f"{res['c']:.4g}"] == max(grid.values()) and res["n_holdout"] == 1
    # Each study was embedded from one slice, the one with the most tumour, cut to 96 × 96.
    store = open_store(out / "store.zarr")
    entries = list(store.series())
    assert len(entries) == 20
    for e in entries:
        assert e.attrs["n_slices"] == 1 and e.attrs["recipe"]["roi"]["mm"], e.attrs
        assert e.attrs["geometry"]["shape"] == [1, 96, 96]
    assert sorted(e.attrs["geometry"]["origin"][2] for e in entries) == sorted(tumour_z.values())
