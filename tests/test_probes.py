"""Offline probes on cached features: a synthetic lesion set a correct pipeline must learn,
and a shuffled-label control it must not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer
from radcache.embeddings.encode import Encoder
from radcache.embeddings.probes import (
    features,
    fewshot,
    knn,
    linear,
    patient_split,
    pool_slices,
    read_labels,
    scores,
)
from tests.dicomgen import write_series

N = 100


def lesion_phantom(seed: int, lesion: bool, n: int = 3, size: int = 112) -> np.ndarray:
    """A soft-tissue body of random size in air; with ``lesion``, a bright round lesion
    of random size and place inside it (stored values, HU + 1024)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    ry, rx = rng.uniform(30, 48, size=2)
    body = ((y - size / 2) / ry) ** 2 + ((x - size / 2) / rx) ** 2 <= 1
    vol = np.where(body, 40.0, -1000.0)[None].repeat(n, 0) + rng.normal(0, 10, (n, size, size))
    if lesion:
        r = rng.uniform(6, 12)
        cy = size / 2 + rng.uniform(-0.4, 0.4) * ry
        cx = size / 2 + rng.uniform(-0.4, 0.4) * rx
        vol[:, (y - cy) ** 2 + (x - cx) ** 2 <= r**2] += 250.0
    return (vol + 1024).astype(np.int16)


@pytest.fixture(scope="module")
def lesion_store(
    tmp_path_factory: pytest.TempPathFactory, tiny_fp32: Encoder, pseudo: Pseudonymizer
) -> tuple[EmbeddingStore, Path]:
    tmp = tmp_path_factory.mktemp("probes")
    store = EmbeddingStore(tmp / "store.zarr")
    pipe = Pipeline(tiny_fp32, store, pseudo, patch_tokens=False)
    rows = ["series,finding"]
    for i in range(N):
        gen = write_series(
            tmp / f"v{i}",
            lesion_phantom(i, lesion=i % 2 == 1),
            study_uid=f"1.2.826.0.1.3680043.8.498.7{i:03d}",
            extra={"PatientID": f"PHANTOM{i:03d}"},  # one patient each
        )
        (res,) = pipe.embed([gen.directory]).series
        rows.append(f"{res.series},{'lesion' if i % 2 else 'none'}")
    labels = tmp / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return store, labels


def test_a_correct_pipeline_beats_chance_and_shuffled_labels_do_not(lesion_store) -> None:
    store, labels_csv = lesion_store
    # CLS + mean patch token: the random-weight test model's CLS alone carries little of
    # the image, its patch tokens more (a trained DINOv2 needs no such help).
    f = features(store, kind="cls+meanpatch", labels=read_labels(labels_csv))
    assert f.x.shape == (N, 128) and set(f.labels("finding")) == {"lesion", "none"}
    split = patient_split(f, (0.5, 0.2, 0.3))
    parts = {s: f.take(np.flatnonzero(split == s)) for s in ("train", "val", "test")}
    patients = {s: {r["patient"] for r in p.rows} for s, p in parts.items()}
    assert not (patients["train"] & patients["test"]) and not (patients["val"] & patients["test"])
    res = linear(parts["train"], parts["val"], parts["test"], "finding", bootstrap=300)
    bal = res["test"]["balanced_accuracy"]
    assert bal["low"] > 0.5, res  # clearly above chance: the interval leaves 0.5 out
    # The control: the same protocol with the labels shuffled across patients.
    rng = np.random.default_rng(0)
    shuffled = f.take(np.arange(len(f)))
    perm = rng.permutation(len(f))
    shuffled.rows = [
        {**r, "labels": f.rows[j]["labels"]} for r, j in zip(f.rows, perm, strict=True)
    ]
    sp = {s: shuffled.take(np.flatnonzero(split == s)) for s in ("train", "val", "test")}
    ctrl = linear(sp["train"], sp["val"], sp["test"], "finding", bootstrap=300)
    cb = ctrl["test"]["balanced_accuracy"]
    assert cb["low"] <= 0.5 <= cb["high"], ctrl  # chance is inside the control's interval
    assert bal["value"] > cb["value"]
    print(json.dumps({"linear": bal, "shuffled": cb}))


def test_knn_fewshot_and_3d_pooling_run_deterministically(lesion_store) -> None:
    store, labels_csv = lesion_store
    given = read_labels(labels_csv)
    f = features(store, labels=given)
    split = patient_split(f, (0.7, 0.0, 0.3))
    tr, te = f.take(np.flatnonzero(split == "train")), f.take(np.flatnonzero(split == "test"))
    a = knn(tr, te, "finding", ks=(5, 20), bootstrap=200)
    b = knn(tr, te, "finding", ks=(5, 20), bootstrap=200)
    assert a == b and set(a["by_k"]) == {"5", "20"}  # same figures on every run
    fs = fewshot(tr, te, "finding", shots=(1, 4), draws=3)
    assert set(fs["by_shots"]) == {"1", "4"}
    assert set(fs["by_shots"]["4"]) == {"knn", "logreg"}
    sl = features(store, level="slice", labels=given)
    assert len(sl) == 3 * N and {r["slice"] for r in sl.rows} == {0, 1, 2}
    vol = pool_slices(sl, "mean+max")
    assert vol.x.shape == (N, 128) and vol.labels("finding")[0] in ("lesion", "none")
    np.testing.assert_allclose(pool_slices(sl).x, f.x, rtol=1e-5, atol=1e-6)  # pooled = mean


def test_scores_are_sklearn_with_bootstrap_intervals() -> None:
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3], [0.3, 0.7]])
    s = scores(y, p, bootstrap=300)
    assert s["accuracy"]["value"] == pytest.approx(4 / 6)
    assert s["macro_auroc"]["value"] == pytest.approx(6 / 9)  # 6 of 9 pairs ranked right
    assert s["accuracy"]["low"] <= s["accuracy"]["value"] <= s["accuracy"]["high"]


def test_probe_and_export_commands(lesion_store, tmp_path: Path) -> None:
    from tests.test_cli import run

    store, labels_csv = lesion_store
    out = tmp_path / "linear.json"
    p = run(
        "probe", "linear", "--store", store.url, "--labels", str(labels_csv),
        "--label", "finding", "--kind", "cls+meanpatch", "--bootstrap", "100", "-o", str(out),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["protocol"] == "linear" and res["test"]["balanced_accuracy"]["value"] > 0.5
    npz = tmp_path / "f.npz"
    p = run("export", "--store", store.url, "--level", "slice", "-o", str(npz))
    assert p.returncode == 0, p.stderr
    with np.load(npz) as z:
        assert z["x"].shape == (3 * N, 64) and set(z["slice"]) == {0, 1, 2}
    bad = run("probe", "linear", "--store", str(tmp_path / "none.zarr"), "--label", "x")
    assert bad.returncode == 2 and "not-found" in bad.stderr
