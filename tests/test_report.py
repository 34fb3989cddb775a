"""Probe reports: every protocol's result becomes result.json, report.md and readable PNGs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from radcache.embeddings.errors import InputError
from radcache.embeddings.probes import Overlay, write_report

CLASSES = ["a", "b", "c"]
NAN = float("nan")
METRICS = ("accuracy", "balanced_accuracy", "macro_auroc", "mcc", "macro_f1")


def cell(v: float | None) -> dict[str, float | None]:
    if v is None or math.isnan(v):
        return {"value": v, "low": v, "high": v}
    return {"value": v, "low": v - 0.05, "high": v + 0.05}


def score_dict(base: float, metrics: tuple[str, ...] = METRICS) -> dict[str, Any]:
    return {m: cell(base + 0.01 * i) for i, m in enumerate(metrics)}


def predictions(multilabel: bool = False, n: int = 30, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    proba = rng.dirichlet(np.ones(len(CLASSES)), n)
    if multilabel:
        y: list[Any] = (rng.random((n, len(CLASSES))) < proba + 0.2).astype(int).tolist()
    else:
        y = np.where(rng.random(n) < 0.7, proba.argmax(1), rng.integers(0, 3, n)).tolist()
    return {
        "classes": CLASSES,
        "y": y,
        "proba": proba.tolist(),
        "entries": [f"e{i}" for i in range(n)],
        "slices": [None] * n,
    }


COMMON = {"label": "finding", "classes": CLASSES, "space": "dinov2-s", "level": "series"}


def knn_result(multilabel: bool = False) -> dict[str, Any]:
    metrics = ("macro_auroc", "macro_f1", "mean_ap") if multilabel else METRICS
    by_k = {str(k): score_dict(0.6 + 0.02 * i, metrics) for i, k in enumerate((5, 20, 50))}
    by_k["50"][metrics[0]] = cell(NAN)
    out = {**COMMON, "protocol": "knn", "kind": "pooled", "split_seed": 0, "temperature": 0.07}
    out |= {"n_train": 60, "n_val": 10, "n_test": 30, "val_by_k": by_k, "k": 20}
    out |= {"selected_by": f"validation {metrics[1]}", "test": score_dict(0.7, metrics)}
    return out | {"multilabel": multilabel, "predictions": predictions(multilabel)}


def fewshot_result() -> dict[str, Any]:
    def head(m: float) -> dict[str, Any]:
        return {k: {"mean": m, "std": 0.05} for k in METRICS}

    shots = (1, 2, 4, 8)
    by_shots = {
        str(n): {"knn": head(0.4 + 0.05 * i), "logreg": head(0.45 + 0.05 * i)}
        for i, n in enumerate(shots)
    }
    return {
        **COMMON,
        "protocol": "fewshot",
        "draws": 5,
        "k": 20,
        "n_test": 30,
        "by_shots": by_shots,
    }


def linear_result() -> dict[str, Any]:
    grid = {str(c): 0.5 + 0.03 * i for i, c in enumerate((1e-4, 1e-2, 1.0, 100.0))}
    return {
        **COMMON,
        "protocol": "linear",
        "n_train": 60,
        "n_val": 10,
        "n_test": 30,
        "val_balanced_accuracy_by_c": grid,
        "c": 1.0,
        "test": score_dict(0.7),
        "predictions": predictions(),
    }


def seg_result() -> dict[str, Any]:
    names = ["background", "liver", "tumour"]
    return {
        "protocol": "seg",
        "classes": names,
        "n_train_slices": 200,
        "n_test_slices": 50,
        "n_test_volumes": 4,
        "dice_2d": {"liver": cell(0.85), "tumour": cell(0.4)},
        "dice_3d": {"liver": cell(0.9), "tumour": cell(NAN)},
        "loss_curve": [1.0 / (e + 1) for e in range(10)],
        "note": "RANDOM-WEIGHT MODEL",
    }


def overlays() -> list[Overlay]:
    y, x = np.mgrid[:64, :64]
    ref = ((y - 32) ** 2 + (x - 32) ** 2 < 300).astype(int) + ((y - 30) ** 2 + (x - 36) ** 2 < 30)
    pred = np.roll(ref, 3, axis=1)
    image = np.sin(x / 5.0) * 400 - 200.0
    return [Overlay("slice 12", image, pred, ref), Overlay("slice 20", None, ref * 0, ref)]


def check_png(path: Path) -> None:
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data.startswith(b"\x89PNG")
    assert len(data) > 5_000, path.name
    img = imread(path)
    assert img.ndim == 3
    assert img.shape[0] >= 300
    assert img.shape[1] >= 300
    assert img.shape[2] in (3, 4)


def check_report(
    result: dict[str, Any], tmp_path: Path, pngs: list[str], headers: list[str], **kw: Any
) -> str:
    path = write_report(result, tmp_path / "out", **kw)
    assert path == tmp_path / "out" / "report.md"
    md = path.read_text()
    for h in headers:
        assert h in md
    for name in pngs:
        check_png(path.parent / name)
        assert f"]({name})" in md
    assert sorted(p.name for p in path.parent.glob("*.png")) == sorted(pngs)
    saved = json.loads((path.parent / "result.json").read_text())
    assert saved["protocol"] == result["protocol"]
    return md


def test_knn_report(tmp_path: Path) -> None:
    result = knn_result()
    md = check_report(
        result,
        tmp_path,
        ["knn_k_sweep.png", "confusion_matrix.png", "roc.png"],
        [
            "# knn probe — finding",
            "Chosen k: 20 (validation balanced_accuracy).",
            "| accuracy | 0.700 [0.650, 0.750] |",  # test, at the chosen k
            "| k | validation accuracy | validation balanced_accuracy |",
        ],
    )
    assert "| 20 (chosen) | 0.620 | 0.630 |" in md  # validation figures of k = 20
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["val_by_k"]["50"]["accuracy"]["value"] is None  # NaN written as null
    assert "space `dinov2-s`" in md
    assert "split seed `0`" in md


def test_knn_multilabel_report(tmp_path: Path) -> None:
    md = check_report(
        knn_result(multilabel=True),
        tmp_path,
        ["knn_k_sweep.png", "roc.png"],
        ["| k | validation macro_auroc | validation macro_f1 | validation mean_ap |"],
    )
    assert "confusion_matrix" not in md


def test_fewshot_report(tmp_path: Path) -> None:
    md = check_report(
        fewshot_result(),
        tmp_path,
        ["fewshot_curve.png"],
        ["# fewshot probe — finding", "| shots | head | balanced accuracy | macro AUROC |"],
    )
    assert "| 1 | knn | 0.400 ± 0.050 | 0.400 ± 0.050 |" in md


def test_linear_report(tmp_path: Path) -> None:
    md = check_report(
        linear_result(),
        tmp_path,
        ["linear_c_sweep.png", "confusion_matrix.png", "roc.png"],
        [
            "# linear probe — finding",
            "| metric | test [95 % CI] |",
            "Chosen C: 1 (best validation balanced accuracy).",
        ],
    )
    assert "| accuracy | 0.700 [0.650, 0.750] |" in md


def test_linear_report_of_the_studys_grid(tmp_path: Path) -> None:
    result = {
        k: v for k, v in linear_result().items() if k not in ("c", "val_balanced_accuracy_by_c")
    }
    grid = {"blocks=1 avgpool=True lr=0.001": 0.61, "blocks=4 avgpool=False lr=0.05": 0.72}
    result |= {"method": "baharoon2023", "val_auroc_by_setting": grid}
    result |= {
        "setting": {"blocks": 4, "avgpool": False, "lr": 0.05},
        "head": {"val_metric": "auroc"},
    }
    md = check_report(
        result,
        tmp_path,
        ["confusion_matrix.png", "roc.png"],
        [
            "method `baharoon2023`",
            "Chosen setting: blocks 4, avgpool False, lr 0.05 (best validation auroc).",
            "| blocks=4 avgpool=False lr=0.05 | 0.720 |",
        ],
    )
    assert "Chosen C" not in md


def test_linear_multilabel_grid_name(tmp_path: Path) -> None:
    result = linear_result()
    result["val_macro_auroc_by_c"] = result.pop("val_balanced_accuracy_by_c")
    result["predictions"] = predictions(multilabel=True)
    result["multilabel"] = True
    check_report(
        result, tmp_path, ["linear_c_sweep.png", "roc.png"], ["(best validation macro auroc)"]
    )


def test_seg_report(tmp_path: Path) -> None:
    md = check_report(
        seg_result(),
        tmp_path,
        ["dice.png", "loss.png", "overlay_0.png", "overlay_1.png"],
        ["# seg probe", "| class | Dice 2D (per slice) | Dice 3D (per volume) |"],
        overlays=overlays(),
    )
    assert md.splitlines()[2] == "> RANDOM-WEIGHT MODEL"
    assert "| tumour | 0.400 [0.350, 0.450] | n/a |" in md


def test_missing_values_render_na(tmp_path: Path) -> None:
    result = knn_result()
    result["val_by_k"]["5"] = {m: cell(None) for m in METRICS}
    result["val_by_k"]["20"]["mcc"] = {"value": NAN}
    result["val_by_k"]["20"]["macro_f1"] = {"value": 0.5, "low": None, "high": None}
    del result["predictions"]
    md = check_report(
        result, tmp_path, ["knn_k_sweep.png"], ["| 5 | n/a | n/a | n/a | n/a | n/a |"]
    )
    row = next(line for line in md.splitlines() if line.startswith("| 20"))
    assert row.endswith("| n/a | 0.500 |")


@pytest.mark.parametrize(
    ("result", "pngs"),
    [
        ({"protocol": "knn", "label": "x", "k": None, "val_by_k": {}}, []),
        (
            {"protocol": "fewshot", "label": "x", "by_shots": {"1": {"knn": {}}, "2": {}}},
            ["fewshot_curve.png"],
        ),
        ({"protocol": "linear", "label": "x", "c": None, "test": {"mcc": {"value": NAN}}}, []),
        (
            {"protocol": "seg", "dice_2d": {"a": {"value": NAN}}, "loss_curve": [NAN]},
            ["dice.png", "loss.png"],
        ),
    ],
)
def test_sparse_results_render(tmp_path: Path, result: dict[str, Any], pngs: list[str]) -> None:
    md = write_report(result, tmp_path).read_text()
    assert "n/a" in md or result["protocol"] == "knn"
    assert sorted(p.name for p in tmp_path.glob("*.png")) == pngs
    for name in pngs:
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_rejects_unknown_protocol_and_bad_overlay(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown protocol"):
        write_report({"protocol": "umap"}, tmp_path)
    bad = Overlay("bad", None, np.zeros((4, 4), int), np.zeros((5, 5), int))
    with pytest.raises(InputError, match="shapes"):
        write_report(seg_result(), tmp_path, [bad])


def test_import_is_cheap() -> None:
    code = "import sys, radcache.embeddings.probes.report; assert 'matplotlib' not in sys.modules"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
