"""Offline probes on cached features: a synthetic lesion set a correct pipeline must learn,
and a shuffled-label control it must not."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer
from radcache.embeddings.encode import Encoder
from radcache.embeddings.errors import InputError
from radcache.embeddings.index import normalise
from radcache.embeddings.probes import (
    Features,
    column_split,
    export_features,
    features,
    fewshot,
    knn,
    linear,
    ml_knn,
    patient_split,
    pool_slices,
    read_labels,
    scores,
    scores_multilabel,
)
from tests.dicomgen import write_nifti, write_series

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
    split = patient_split(f, (0.6, 0.1, 0.3))
    tr, va, te = (f.take(np.flatnonzero(split == s)) for s in ("train", "val", "test"))
    a = knn(tr, va, te, "finding", ks=(5, 20), bootstrap=200)
    b = knn(tr, va, te, "finding", ks=(5, 20), bootstrap=200)
    assert a == b and set(a["val_by_k"]) == {"5", "20"}  # same figures on every run
    assert a["k"] in (5, 20) and a["n_support"] == len(tr) + len(va)
    pred = a["predictions"]
    assert pred["classes"] == a["classes"] and len(pred["y"]) == len(pred["proba"]) == len(te)
    assert pred["entries"] == [r["entry"] for r in te.rows]
    fs = fewshot(tr, va, te, "finding", shots=(1, 4), draws=3)
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
    out = tmp_path / "linear"
    p = run(
        "probe", "linear", "--store", store.url, "--labels", str(labels_csv),
        "--label", "finding", "--kind", "cls+meanpatch", "--bootstrap", "100", "-o", str(out),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    res = json.loads((out / "result.json").read_text())
    report = (out / "report.md").read_text()
    assert "![" in report and (out / "roc.png").stat().st_size > 5000
    assert "Warning" not in report and "warnings" not in res  # every patient is known
    assert res["protocol"] == "linear" and res["test"]["balanced_accuracy"]["value"] > 0.5
    npz = tmp_path / "f.npz"
    p = run("export", "--store", store.url, "--level", "slice", "-o", str(npz))
    assert p.returncode == 0, p.stderr
    with np.load(npz) as z:
        assert z["x"].shape == (3 * N, 64) and set(z["slice"]) == {0, 1, 2}
    pq_path = tmp_path / "f.parquet"
    p = run("export", "--store", store.url, "--format", "parquet", "-o", str(pq_path))
    assert p.returncode == 0, p.stderr
    table = pq.read_table(pq_path)
    assert table.num_rows == N and table.schema.field("x").type.list_size == 64
    assert table.schema.metadata[b"level"] == b"series"
    bad = run("probe", "linear", "--store", str(tmp_path / "none.zarr"), "--label", "x")
    assert bad.returncode == 2 and "not-found" in bad.stderr


def test_probe_protocols_select_the_studys_method_and_features(
    lesion_store, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from radcache.service.cli import main

    store, labels_csv = lesion_store
    base = ["--store", store.url, "--labels", str(labels_csv), "--label", "finding"]
    base += ["--bootstrap", "0"]
    out = tmp_path / "linear"
    preset = ["--protocol", "baharoon2023-linear"]
    r = CliRunner().invoke(main, ["probe", "linear", *base, *preset, "-o", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "result.json").read_text())
    assert res["method"] == "baharoon2023" and res["preset"] == "baharoon2023-linear"
    assert res["kind"] == "cls_last4+meanpatch" and res["head"]["epochs"] == 10
    # the random test model has 2 blocks: the grid's "last 4" is both
    assert len(res["val_auroc_by_setting"]) == 2 * 2 * 4 and res["setting"]["blocks"] in (1, 2)
    assert "Chosen setting: blocks" in (out / "report.md").read_text()
    out = tmp_path / "knn"
    r = CliRunner().invoke(
        main, ["probe", "knn", *base, "--protocol", "baharoon2023-knn", "-k", "5", "-k", "20",
               "-o", str(out)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads((out / "result.json").read_text())
    assert res["vote"] == "softmax-partial-sums" and res["kind"] == "cls"
    assert res["k"] in (5, 20) and set(res["val_by_k"]) == {"5", "20"}
    assert "Chosen k:" in (out / "report.md").read_text()
    r = CliRunner().invoke(main, ["probe", "linear", *base, *preset, "--kind", "pooled"])
    assert r.exit_code == 2 and "reads cls_last4+meanpatch" in r.output
    out = tmp_path / "fewshot"
    r = CliRunner().invoke(
        main, ["probe", "fewshot", *base, "--protocol", "baharoon2023-fewshot", "--shots", "2",
               "--draws", "2", "-o", str(out)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads((out / "result.json").read_text())
    assert set(res["by_shots"]["2"]) == {"knn k=2", "linear"}
    assert res["linear_by_shots"]["2"]["head"]["n_fit"] == 2
    # the study's linear input: the last blocks' CLS (the last is the CLS), then mean patch
    wide = features(store, kind="cls_last4+meanpatch")
    assert wide.x.shape == (N, 3 * 64) and wide.meta["cls_blocks"] == 2  # a 2-block model
    np.testing.assert_allclose(wide.x[:, 64:128], features(store, kind="cls").x, atol=1e-5)
    mean_patch = features(store, kind="cls+meanpatch").x[:, 64:]
    np.testing.assert_allclose(wide.x[:, 128:], mean_patch, atol=1e-6)


def test_a_split_by_patient_warns_of_entries_without_one(
    tmp_path: Path, tiny_fp32: Encoder, pseudo: Pseudonymizer, caplog: pytest.LogCaptureFixture
) -> None:
    """NIfTI sent without a patient reference has no patient: the split says so, in the
    log and in the probe's report; sent with one, its entries split by patient."""
    from click.testing import CliRunner

    from radcache.service.cli import main

    store = EmbeddingStore(tmp_path / "store.zarr")
    pipe = Pipeline(tiny_fp32, store, pseudo, patch_tokens=False)
    rows = ["series,finding"]
    for i in range(12):
        nii = write_nifti(tmp_path / f"v{i}.nii", lesion_phantom(i, i % 2 == 1, size=32))
        refs = pseudo.refs(patient=f"PAT-{i // 2}") if i < 8 else None  # 4 without a patient
        (res,) = pipe.embed([nii], refs=refs).series
        rows.append(f"{res.series},{'lesion' if i % 2 else 'none'}")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    f = features(store, labels=read_labels(labels))
    assert sum(r["patient_known"] for r in f.rows) == 8
    assert len({r["patient"] for r in f.rows}) == 4 + 4  # 4 patients, 4 files on their own
    with caplog.at_level("WARNING", logger="radcache.embeddings.probes.splits"):
        patient_split(f)
    assert "4 of 12 rows have no known patient" in caplog.text
    out = tmp_path / "knn"
    r = CliRunner().invoke(
        main,
        ["probe", "knn", "--store", store.url, "--labels", str(labels), "--label", "finding",
         "-k", "1", "--bootstrap", "0", "-o", str(out)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    (warning,) = json.loads((out / "result.json").read_text())["warnings"]
    assert "4 of 12 series rows have no known patient" in warning
    assert f"> **Warning:** {warning}" in (out / "report.md").read_text()


def test_probes_on_too_little_data_say_what_is_missing(
    tmp_path: Path, tiny_fp32: Encoder, pseudo: Pseudonymizer
) -> None:
    """Two patients leave a split empty (three splits): every probe stops before fitting,
    with the insufficient-data code, exit status 2, what each split holds and what to
    change; never a traceback."""
    from click.testing import CliRunner

    from radcache.service.cli import main

    store = EmbeddingStore(tmp_path / "store.zarr")
    pipe = Pipeline(tiny_fp32, store, pseudo, patch_tokens=False)
    rows = ["series,finding,split"]
    for i, split in enumerate(("train", "test")):
        nii = write_nifti(tmp_path / f"v{i}.nii", lesion_phantom(i, i == 1, size=32))
        (res,) = pipe.embed([nii], refs=pseudo.refs(patient=f"PAT-{i}")).series
        rows.append(f"{res.series},{'lesion' if i else 'none'},{split}")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    base = ["--store", store.url, "--labels", str(labels), "--bootstrap", "0"]
    split_by_patient = r"split has no rows labelled 'finding'|are all of one class"
    cases = {
        ("knn", "--label", "finding", "-k", "5", "-k", "20"): split_by_patient,
        ("linear", "--label", "finding", "--level", "slice"): split_by_patient,
        ("fewshot", "--label", "finding"): split_by_patient,
        ("linear", "--label", "finding", "--protocol", "baharoon2023-linear"): split_by_patient,
        ("knn", "--label", "finding", "--split-column", "split", "-k", "1"): "all of one class",
        ("knn", "--label", "grade"): "the labels given are 'finding', 'split'",
    }
    for args, says in cases.items():
        r = CliRunner().invoke(main, ["probe", *args, *base, "-o", str(tmp_path / "out")])
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (args, r.output)
        assert r.stderr.startswith("error [insufficient-data] "), (args, r.stderr)
        assert re.search(says, r.stderr), (args, r.stderr)
        assert "Traceback" not in r.output and not (tmp_path / "out").exists()
        if args[-1] != "grade":  # what each split holds, and what to change
            assert re.search(
                r"train: (1 patient, (1 row|3 rows) \((lesion|none) [13]\)|no rows)", r.stderr
            )
            assert "test: " in r.stderr and "--split-column" in r.stderr, r.stderr


# -- multi-label (ChestX-ray14-style "A|B" label sets), labels and export files ------------
def ml_knn_loop(sims, train_sims, y, k, s):
    """ML-kNN written out as in Zhang & Zhou (2007), one class and one example at a time."""
    n, n_classes = y.shape

    def nearest(row, skip):
        return [j for j in np.argsort(-row, kind="stable") if j != skip][:k]

    out = np.zeros((len(sims), n_classes))
    for c in range(n_classes):
        prior = (s + y[:, c].sum()) / (2 * s + n)
        have, lack = [0] * (k + 1), [0] * (k + 1)
        for i in range(n):
            (have if y[i, c] else lack)[sum(y[j, c] for j in nearest(train_sims[i], i))] += 1
        for t in range(len(sims)):
            m = sum(y[j, c] for j in nearest(sims[t], -1))
            p1 = prior * (s + have[m]) / (s * (k + 1) + sum(have))
            p0 = (1 - prior) * (s + lack[m]) / (s * (k + 1) + sum(lack))
            out[t, c] = p1 / (p1 + p0)
    return out


@pytest.mark.parametrize(("k", "s"), [(1, 1.0), (5, 1.0), (7, 0.5)])
def test_ml_knn_equals_the_written_out_algorithm(k: int, s: float) -> None:
    rng = np.random.default_rng(k)
    train, queries = normalise(rng.normal(size=(40, 6))), normalise(rng.normal(size=(9, 6)))
    y = (rng.random((40, 4)) < 0.35).astype(np.int64)
    sims, train_sims = queries @ train.T, train @ train.T
    got = ml_knn(sims, train_sims, y, k, s)
    np.testing.assert_allclose(got, ml_knn_loop(sims, train_sims, y, k, s), rtol=0, atol=1e-12)
    with pytest.raises(InputError, match="ML-kNN needs"):
        ml_knn(sims, train_sims, y, 0)


CLASSES = ("Effusion", "Nodule", "Pneumothorax")


def multilabel_set(n: int = 300, dim: int = 16, seed: int = 0) -> Features:
    """Each class a direction in feature space: a row is the sum of its classes' directions
    plus noise; rows without a class are ``No Finding`` (one patient per row)."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(CLASSES), dim))
    y = rng.random((n, len(CLASSES))) < 0.3
    x = (y @ directions * 1.5 + rng.normal(size=(n, dim))).astype(np.float32)
    values = ["|".join(c for c, on in zip(CLASSES, yi, strict=True) if on) for yi in y]
    rows = [
        {"entry": f"e{i}", "study": f"st{i}", "series": f"se{i}", "part": "", "patient": f"p{i}"}
        | {"modality": "DX", "slice": None, "labels": {"finding": v or "No Finding"}}
        for i, v in enumerate(values)
    ]
    return Features(x, rows, "series", "cls", "test-space", {"model": {"name": "none"}})


def test_multilabel_probes_learn_label_sets_and_shuffled_sets_do_not() -> None:
    f = multilabel_set()
    split = patient_split(f, (0.6, 0.2, 0.2))
    tr, va, te = (f.take(np.flatnonzero(split == s)) for s in ("train", "val", "test"))
    rng = np.random.default_rng(1)
    shuffled = f.take(np.arange(len(f)))
    shuffled.rows = [
        {**r, "labels": f.rows[j]["labels"]}
        for r, j in zip(f.rows, rng.permutation(len(f)), strict=True)
    ]
    sh = {s: shuffled.take(np.flatnonzero(split == s)) for s in ("train", "val", "test")}
    trva = Features.concat([tr, va])

    res = knn(tr, va, te, "finding", ks=(5, 20), bootstrap=50, multilabel=True)
    assert res["multilabel"] and res["classes"] == sorted([*CLASSES, "No Finding"])
    best = res["test"]
    assert best["macro_auroc"]["low"] > 0.6, best
    assert set(best) == {"macro_auroc", "macro_f1", "mean_ap", "per_class_auroc"}
    assert set(best["per_class_auroc"]) == set(res["classes"])
    pred = res["predictions"]
    assert np.asarray(pred["y"]).shape == np.asarray(pred["proba"]).shape == (len(te), 4)
    assert pred["slices"] == [None] * len(te)
    # the protocol's probabilities are ML-kNN's on cosine similarities
    a, b = normalise(te.x), normalise(trva.x)
    sets = trva.label_sets("finding")
    y = np.asarray([[c in s for c in res["classes"]] for s in sets], dtype=np.int64)
    np.testing.assert_allclose(pred["proba"], ml_knn(a @ b.T, b @ b.T, y, res["k"]), atol=1e-9)
    ctrl = knn(
        sh["train"], sh["val"], sh["test"], "finding", ks=(5, 20), bootstrap=50, multilabel=True
    )
    cb = ctrl["test"]["macro_auroc"]
    assert cb["low"] <= 0.5 <= cb["high"], cb

    lin = linear(tr, va, te, "finding", cs=(0.01, 1.0), bootstrap=50, multilabel=True)
    auroc = lin["test"]["macro_auroc"]
    assert auroc["low"] > 0.6 and set(lin["val_macro_auroc_by_c"]) == {"0.01", "1.0"}, lin
    assert np.asarray(lin["predictions"]["proba"]).shape == (len(te), 4)
    lc = linear(*sh.values(), "finding", cs=(0.01, 1.0), bootstrap=50, multilabel=True)
    lcb = lc["test"]["macro_auroc"]
    assert lcb["low"] <= 0.5 <= lcb["high"], lc
    figures = {"knn": best["macro_auroc"], "linear": auroc, "shuffled": [cb, lcb]}
    print(json.dumps(figures))
    with pytest.raises(InputError, match="few-shot"):
        fewshot(tr, va, te, "finding", multilabel=True)


def test_label_sets_and_multilabel_scores() -> None:
    f = multilabel_set(n=4)
    f.rows[1]["labels"] = {"finding": ""}
    f.rows[2]["labels"] = {}
    f.rows[3]["labels"] = {"finding": "Effusion | Nodule"}
    sets = f.label_sets("finding")
    assert sets[1:] == [frozenset(), None, frozenset({"Effusion", "Nodule"})]
    y = np.array([[1, 0], [0, 0], [1, 1], [0, 1], [1, 0], [0, 1]])
    p = np.array([[0.9, 0.2], [0.3, 0.4], [0.6, 0.7], [0.4, 0.1], [0.2, 0.3], [0.1, 0.8]])
    s = scores_multilabel(y, p, ["a", "b"], bootstrap=100)
    from sklearn.metrics import average_precision_score, roc_auc_score

    assert s["macro_auroc"]["value"] == pytest.approx(roc_auc_score(y, p, average="macro"))
    assert s["mean_ap"]["value"] == pytest.approx(average_precision_score(y, p, average="macro"))
    assert s["per_class_auroc"] == pytest.approx(
        dict(zip("ab", roc_auc_score(y, p, average=None), strict=True))
    )
    assert s["macro_auroc"]["low"] <= s["macro_auroc"]["value"] <= s["macro_auroc"]["high"]


def test_labels_read_alike_from_csv_and_parquet(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "series,slice,finding,grade\n1.2.3,,Effusion|Nodule,2\n1.2.3,4,,1\n1.2.4,,No Finding,\n"
    )
    table = pa.table(
        {
            "series": ["1.2.3", "1.2.3", "1.2.4"],
            "slice": pa.array([None, 4, None], pa.int32()),
            "finding": ["Effusion|Nodule", None, "No Finding"],
            "grade": [2, 1, None],
        }
    )
    pq.write_table(table, tmp_path / "labels.parquet")
    expected = {
        "1.2.3": {"finding": "Effusion|Nodule", "grade": "2"},
        "1.2.3@4": {"grade": "1"},
        "1.2.4": {"finding": "No Finding"},
    }
    assert read_labels(csv) == read_labels(tmp_path / "labels.parquet") == expected
    (tmp_path / "bad.parquet").write_text("series,finding\n")
    with pytest.raises(InputError, match="Parquet"):
        read_labels(tmp_path / "bad.parquet")


def test_export_writes_parquet_and_npz_atomically(tmp_path: Path) -> None:
    f = multilabel_set(n=5, dim=8)
    f.rows[0] = {**f.rows[0], "slice": 3, "modality": None}
    out = tmp_path / "f.parquet"
    out.write_text("an older export")  # replaced whole
    assert export_features(f, out, "parquet") == out
    table = pq.read_table(out)
    assert table.schema.field("x").type == pa.list_(pa.float32(), 8)
    x = table.column("x").combine_chunks().flatten().to_numpy().reshape(-1, 8)
    np.testing.assert_array_equal(x, f.x)
    assert table.column("entry").to_pylist() == [r["entry"] for r in f.rows]
    assert table.column("slice").to_pylist() == [3, None, None, None, None]
    assert table.column("modality").to_pylist()[:2] == [None, "DX"]
    assert json.loads(table.column("labels")[0].as_py()) == f.rows[0]["labels"]
    meta = table.schema.metadata
    assert meta[b"space"] == b"test-space" and meta[b"kind"] == b"cls"
    assert json.loads(meta[b"model"]) == {"name": "none"}
    export_features(f, tmp_path / "f.npz")
    with np.load(tmp_path / "f.npz") as z:
        np.testing.assert_array_equal(z["x"], f.x)
        assert list(z["slice"]) == [3, -1, -1, -1, -1] and z["modality"][0] == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npz", "f.parquet"]  # no leftovers


def test_an_official_split_column_is_used_and_checked() -> None:
    f = multilabel_set(n=30)
    for i, r in enumerate(f.rows):
        r["labels"]["split"] = ("train", "val", "test")[i % 3]
    split = column_split(f, "split")
    assert list(split[:4]) == ["train", "val", "test", "train"]
    f.rows[7]["labels"]["split"] = "holdout"
    with pytest.raises(InputError, match=r"'split' of se7 is 'holdout'"):
        column_split(f, "split")


@pytest.fixture(scope="module")
def ct_mr_store(
    tmp_path_factory: pytest.TempPathFactory, tiny_fp32: Encoder, pseudo: Pseudonymizer
) -> EmbeddingStore:
    """One CT and one MR series: two spaces (their recipes resolve differently)."""
    tmp = tmp_path_factory.mktemp("ctmr")
    store = EmbeddingStore(tmp / "store.zarr")
    pipe = Pipeline(tiny_fp32, store, pseudo, patch_tokens=False)
    for i, mod in enumerate(("CT", "MR")):
        gen = write_series(tmp / mod, lesion_phantom(i, False, n=2, size=48), modality=mod)
        pipe.embed([gen.directory])
    return store


def test_spaces_are_described_and_chosen_by_modality(
    ct_mr_store: EmbeddingStore, tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from radcache.service.cli import main

    store = ct_mr_store
    assert len(store.spaces()) == 2
    base = ["export", "--store", store.url, "--level", "slice", "--format", "npz"]
    r = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "f.npz")])
    assert r.exit_code != 0
    text = " ".join(r.output.split())
    assert "--space" in text and "space=" not in text, r.output
    for sp in store.spaces():  # each listed with model, modality, recipe and entry count
        assert sp in text
    assert "· CT · ct-windows" in text and "· MR · percentile" in text, r.output
    assert "1 entry" in text
    r = CliRunner().invoke(main, [*base, "--modality", "ct", "-o", str(tmp_path / "ct.npz")])
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "ct.npz", allow_pickle=True) as z:
        assert z["x"].shape[0] == 2  # the CT series' two slices
    r = CliRunner().invoke(main, [*base, "--modality", "PT", "-o", str(tmp_path / "pt.npz")])
    assert r.exit_code != 0 and "0 spaces match --modality PT" in " ".join(r.output.split())
    for cmd in (["show", "--spaces", store.url], ["index", "list", "--store", store.url]):
        r = CliRunner().invoke(main, cmd, env={"COLUMNS": "80"})
        assert r.exit_code == 0 and all(sp in r.output for sp in store.spaces()), r.output
        assert "CT" in r.output and "MR" in r.output
    r = CliRunner().invoke(main, ["index", "info", "--store", store.url], env={"COLUMNS": "80"})
    assert r.exit_code == 0 and all(sp in r.output for sp in store.spaces()), r.output
    r = CliRunner().invoke(main, ["index", "list", "--store", store.url, "--json"])
    listed = {s["modalities"][0]: s for s in json.loads(r.output)}
    assert listed["CT"]["entries"] == 1 and listed["MR"]["recipe"].startswith("percentile")


def test_spaces_are_described_from_table_metadata_alone(
    ct_mr_store: EmbeddingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing reads each table's metadata, not every entry's (one pass over the entries
    only for tables written before they kept their modalities)."""
    from radcache.embeddings.store.spaces import space_summaries

    store = ct_mr_store
    seen = [s.as_dict() for s in space_summaries(store)]
    assert sorted(s["modalities"][0] for s in seen) == ["CT", "MR"]
    read = store.iter_entries
    monkeypatch.setattr(store, "iter_entries", lambda: pytest.fail("read every entry"))
    assert [s.as_dict() for s in space_summaries(store)] == seen
    meta = store.table_meta
    old = lambda name: {k: v for k, v in meta(name).items() if k != "modalities"}  # noqa: E731
    monkeypatch.setattr(store, "table_meta", old)
    monkeypatch.setattr(store, "iter_entries", read)
    assert [s.as_dict() for s in space_summaries(store)] == seen
