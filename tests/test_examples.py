"""The worked examples in examples/ run as documented (with the labelled test model)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

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
