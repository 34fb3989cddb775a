"""The probes choose settings on validation rows only, and ``method="baharoon2023"`` follows
Baharoon et al. 2023's code (MohammedSB/DINOv2ForRadiology, dinov2/eval/classification/):
expected values here are computed from the procedures' definitions, not by radcache."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from radcache.embeddings.errors import InputError
from radcache.embeddings.probes import Features, SGDHead, fewshot, knn, linear, scores
from radcache.embeddings.probes.targets import _patients_per_class


def make(x: Any, labels: list[str], kind: str = "cls", **meta: object) -> Features:
    rows: list[dict[str, Any]] = [
        {"entry": f"e{i:04d}", "study": f"s{i}", "series": f"se{i}", "part": "", "patient": f"p{i}"}
        | {"modality": "CT", "slice": None, "labels": {"y": v}}
        for i, v in enumerate(labels)
    ]
    return Features(np.asarray(x, np.float32), rows, "series", kind, "sp", dict(meta))  # type: ignore[arg-type]


def unit(i: int, dim: int = 8) -> np.ndarray:
    return np.asarray(np.eye(dim)[i])


def near(i: int, j: int) -> np.ndarray:
    """A unit vector at cosine 0.9 to e_i."""
    return 0.9 * unit(i) + math.sqrt(1 - 0.81) * unit(j)


def val_test_disagree() -> tuple[Features, Features, Features]:
    """Around e0 (val's "b" rows) and e2 (test's "a" rows) the training set has one "b" row
    on the spot and 20 "a" rows at cosine 0.9: k = 1 is right for val and wrong for test,
    k = 21 the other way round; e4 ("a") and e5 ("b") are easy for every k."""
    xs, ys = [unit(0), unit(2)], ["b", "b"]
    xs += [near(0, 1)] * 20 + [near(2, 3)] * 20 + [unit(4)] * 3 + [unit(5)] * 3
    ys += ["a"] * 40 + ["a"] * 3 + ["b"] * 3
    val = make([unit(0), unit(0), unit(4), unit(4)], ["b", "b", "a", "a"])
    test = make([unit(2), unit(2), unit(5), unit(5)], ["a", "a", "b", "b"])
    return make(np.stack(xs), ys), val, test


@pytest.mark.parametrize("method", ["radcache", "baharoon2023"])
def test_knn_chooses_k_on_validation_and_scores_test_once(method: str) -> None:
    train, val, test = val_test_disagree()
    res = knn(train, val, test, "y", ks=(1, 21), bootstrap=0, method=method)  # type: ignore[arg-type]
    metric = "accuracy" if method == "baharoon2023" else "balanced_accuracy"
    assert res["val_by_k"]["1"][metric]["value"] == 1.0
    assert res["val_by_k"]["21"][metric]["value"] == 0.5
    assert res["k"] == 1 and res["test"][metric]["value"] == 0.5  # scored at val's k
    assert res["method"] == method and res["selected_by"] == f"validation {metric}"
    # choosing on the test rows (what the probe did before) picks the other k
    on_test = knn(train, test, test, "y", ks=(1, 21), bootstrap=0, method=method)  # type: ignore[arg-type]
    assert on_test["k"] == 21 and on_test["test"][metric]["value"] == 1.0


def test_a_choice_without_validation_rows_is_an_error() -> None:
    train, _, test = val_test_disagree()
    empty = train.take([])
    with pytest.raises(InputError, match=r"validation split has no rows labelled 'y'.*k is"):
        knn(train, empty, test, "y", ks=(1, 21))
    assert knn(train, empty, test, "y", ks=(21,), bootstrap=0)["k"] == 21  # nothing chosen
    with pytest.raises(InputError, match="C is chosen on it"):
        linear(train, empty, test, "y", cs=(0.1, 1.0))
    assert linear(train, empty, test, "y", cs=(1.0,), bootstrap=0)["c"] == 1.0
    wide = make(np.tile(train.x, 5), train.labels("y").tolist(), "cls_last4+meanpatch")
    wide_test = make(np.tile(test.x, 5), test.labels("y").tolist(), "cls_last4+meanpatch")
    with pytest.raises(InputError, match="feature set and learning rate"):
        linear(wide, wide.take([]), wide_test, "y", method="baharoon2023")
    with pytest.raises(InputError, match="feature set and learning rate"):
        fewshot(wide, wide.take([]), wide_test, "y", shots=(2,), method="baharoon2023")
    one = SGDHead(lrs=(0.01,), blocks=(4,), avgpools=(True,))
    res = linear(wide, wide.take([]), wide_test, "y", method="baharoon2023", head=one, bootstrap=0)
    assert res["setting"] == {"blocks": 4, "avgpool": True, "lr": 0.01}


def partial_sums(
    q: np.ndarray, s: np.ndarray, y: np.ndarray, n_classes: int, ks: Sequence[int], t: float = 0.07
) -> dict[int, np.ndarray]:
    """KnnModule.forward written out: softmax over the top max(ks), partial sums per k."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    widest = min(max(ks), len(s))
    out = {k: np.zeros((len(q), n_classes)) for k in ks}
    for r, row in enumerate(q @ s.T):
        order = np.argsort(-row, kind="stable")[:widest]
        e = np.exp(row[order] / t)
        w = e / e.sum()
        for k in ks:
            for j in range(min(k, widest)):
                out[k][r, y[order[j]]] += w[j]
    return out


def test_reference_knn_scores_are_partial_softmax_sums() -> None:
    rng = np.random.default_rng(3)
    sx, qx = rng.normal(size=(30, 5)), rng.normal(size=(12, 5))
    sy = np.arange(30) % 3
    train = make(sx, ["abc"[v] for v in sy])
    test = make(qx, ["abc"[v] for v in rng.integers(0, 3, 12)])
    res = knn(train, train.take([]), test, "y", ks=(4,), bootstrap=0, method="baharoon2023")
    expected = partial_sums(qx, sx, sy, 3, (4,))[4]
    np.testing.assert_allclose(res["predictions"]["proba"], expected, atol=1e-6)
    # k below the largest: the same top-k sums, not renormalised (rows short of 1)
    val = make(qx[:6], test.labels("y")[:6].tolist())
    res = knn(train, val, test, "y", ks=(2, 7), bootstrap=0, method="baharoon2023")
    want = partial_sums(qx, sx, sy, 3, (2, 7))[res["k"]]
    np.testing.assert_allclose(res["predictions"]["proba"], want, atol=1e-6)
    if res["k"] == 2:
        assert np.asarray(res["predictions"]["proba"]).sum(axis=1).max() < 1 - 1e-6
    yte = np.asarray(res["predictions"]["y"])
    per_class = [roc_auc_score(yte == c, want[:, c]) for c in range(3)]
    assert res["test"]["macro_auroc"]["value"] == pytest.approx(np.mean(per_class))
    assert scores(yte, want, bootstrap=0, raw=True)["macro_auroc"]["value"] == pytest.approx(
        np.mean(per_class)
    )


def sampler_stream(n: int, count: int, seed: int) -> list[int]:
    """InfiniteSampler(shuffle=True) of dinov2/data/samplers.py, one randint at a time."""
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < count:
        perm = list(range(n))
        for i in range(n):
            j = int(torch.randint(i, n, size=(1,), generator=g).item())
            value = perm[j]
            perm[j] = perm[i]
            perm[i] = value
            out.append(value)
    return out[:count]


def plain_run(
    x: np.ndarray, y: np.ndarray, task: str, n_out: int, lr: float, epochs: int, batch: int
) -> Callable[[np.ndarray], np.ndarray]:
    """linear.py's training loop on fixed features, written out."""
    n = len(x)
    steps = epochs * math.ceil(n / batch)
    stream = sampler_stream(n, steps * batch, 0)
    head = torch.nn.Linear(x.shape[1], n_out)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        head.weight.copy_(torch.empty(n_out, x.shape[1]).normal_(0, 0.01, generator=g))
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0)
    xt = torch.tensor(x, dtype=torch.float32)
    for it in range(steps):
        rows = stream[it * batch : (it + 1) * batch]
        out = head(xt[rows])
        if task == "binary":
            loss = torch.nn.BCEWithLogitsLoss()(
                out.squeeze(1), torch.tensor(y[rows], dtype=torch.float32)
            )
        elif task == "multiclass":
            loss = torch.nn.CrossEntropyLoss()(out, torch.tensor(y[rows]))
        else:  # each example's class-mean BCE, summed over the batch
            t = torch.tensor(y[rows], dtype=torch.float32)
            loss = sum(torch.nn.BCEWithLogitsLoss()(out[i], t[i]) for i in range(len(rows)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return lambda z: torch.sigmoid(head(torch.tensor(z, dtype=torch.float32))).detach().numpy()


def val_auroc(y: np.ndarray, s: np.ndarray, task: str) -> float:
    if task == "binary":
        return float(roc_auc_score(y, s[:, 0]))
    ind = np.eye(s.shape[1])[y] if task == "multiclass" else y
    return float(np.mean([roc_auc_score(ind[:, c], s[:, c]) for c in range(s.shape[1])]))


@pytest.mark.parametrize(
    ("task", "n_classes"), [("binary", 2), ("multiclass", 3), ("multilabel", 3)]
)
def test_reference_linear_is_the_plain_sgd_loop(task: str, n_classes: int) -> None:
    d, n = 3, (40, 20, 20)
    rng = np.random.default_rng(n_classes)
    y_all = (
        (rng.random((sum(n), n_classes)) < 0.4).astype(int)
        if task == "multilabel"
        else np.arange(sum(n)) % n_classes
    )
    signal = y_all if task == "multilabel" else np.eye(n_classes)[y_all]
    x_all = rng.normal(size=(sum(n), 5 * d)) + signal @ rng.normal(size=(n_classes, 5 * d))
    names = ["c0", "c1", "c2"][:n_classes]
    if task == "multilabel":
        labels = ["|".join(c for c, on in zip(names, row, strict=True) if on) for row in y_all]
    else:
        labels = [names[v] for v in y_all]
    f = make(x_all, labels, "cls_last4+meanpatch", cls_blocks=4)
    parts = [f.take(np.arange(a, b)) for a, b in ((0, 40), (40, 60), (60, 80))]
    ys = [y_all[:40], y_all[40:60], y_all[60:]]
    head = SGDHead(batch_size=16, epochs=3) if task == "multilabel" else SGDHead(batch_size=16)
    res = linear(
        parts[0], parts[1], parts[2], "y", method="baharoon2023", head=head, bootstrap=0,
        multilabel=task == "multilabel",
    )  # fmt: skip

    def cols(x: np.ndarray, blocks: int, avgpool: bool) -> np.ndarray:
        cls = x[:, (4 - blocks) * d : 4 * d]  # CLS of the last `blocks` of 4, then mean patch
        return np.concatenate([cls, x[:, 4 * d :]], axis=1) if avgpool else cls

    n_out = 1 if task == "binary" else n_classes
    best, best_score, grid = None, 0.0, {}
    for blocks in (1, 4):
        for avgpool in (True, False):
            for lr in (1e-3, 5e-3, 1e-2, 5e-2):
                fwd = plain_run(
                    cols(parts[0].x, blocks, avgpool), ys[0], task, n_out, lr, head.epochs, 16
                )
                score = val_auroc(ys[1], fwd(cols(parts[1].x, blocks, avgpool)), task)
                grid[f"blocks={blocks} avgpool={avgpool} lr={lr:g}"] = score
                if score > best_score:
                    best, best_score = (blocks, avgpool, lr), score
    assert res["val_auroc_by_setting"] == pytest.approx(grid, abs=1e-6)
    assert best is not None and res["setting"] == dict(
        zip(("blocks", "avgpool", "lr"), best, strict=True)
    )
    fit_x = np.concatenate([parts[0].x, parts[1].x])
    fwd = plain_run(
        cols(fit_x, *best[:2]), np.concatenate(ys[:2]), task, n_out, best[2], head.epochs, 16
    )
    s = fwd(cols(parts[2].x, *best[:2]))
    want = np.concatenate([1 - s, s], axis=1) if task == "binary" else s
    np.testing.assert_allclose(res["predictions"]["proba"], want, atol=1e-6)
    assert res["head"]["batch_size"] == 16 and res["head"]["n_fit"] == 60


def test_reference_fewshot_draws_as_the_reference() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 60)
    x = rng.normal(size=(60, 10)) + np.eye(3)[y] @ rng.normal(size=(3, 10)) * 2
    f = make(x, ["abc"[v] for v in y], "cls_last4+meanpatch", cls_blocks=1)
    train, val, test = f.take(np.arange(36)), f.take(np.arange(36, 48)), f.take(np.arange(48, 60))
    res = fewshot(
        train, val, test, "y", method="baharoon2023", shots=(2, 5), draws=3, ks=(1, 3),
        head=SGDHead(lrs=(0.01, 0.05), batch_size=8), refit_with_val=True,
    )  # fmt: skip
    assert set(res["by_shots"]["2"]) == {"knn k=1", "knn k=2", "linear"}
    assert set(res["by_shots"]["5"]) == {"knn k=1", "knn k=3", "knn k=5", "linear"}
    # kNN: knn.py's filter_train (torch seed t, randperm per class), k ≤ n and k = n
    ytr, yte = y[:36], y[48:]
    for n, k in ((2, 2), (5, 3)):
        accs = []
        for t in range(3):
            with torch.random.fork_rng():
                torch.manual_seed(t)
                pick = np.concatenate(
                    [
                        np.flatnonzero(ytr == c)[torch.randperm(int((ytr == c).sum()))[:n].numpy()]
                        for c in range(3)
                    ]
                )
            p = partial_sums(
                x[48:, :5], x[:36][pick, :5], ytr[pick], 3, sorted({1, 3, n} & set(range(n + 1)))
            )[k]
            accs.append(np.mean(p.argmax(axis=1) == yte))
        assert res["by_shots"][str(n)][f"knn k={k}"]["accuracy"]["mean"] == pytest.approx(
            np.mean(accs)
        )
    # linear: `shots` rows in total, evenly spaced, then linear.py's run on them
    pick = np.arange(0, 36, 36 / 5).round().astype(int)
    assert pick.tolist() == [0, 7, 14, 22, 29]
    alone = linear(
        train.take(pick), val, test, "y", method="baharoon2023", bootstrap=0,
        head=SGDHead(lrs=(0.01, 0.05), batch_size=8),
    )  # fmt: skip
    assert res["linear_by_shots"]["5"]["setting"] == alone["setting"]
    got = res["by_shots"]["5"]["linear"]["macro_auroc"]
    assert got == {"mean": pytest.approx(alone["test"]["macro_auroc"]["value"]), "std": 0.0}
    shots_only = fewshot(
        train, val, test, "y", method="baharoon2023", shots=(5,), draws=1,
        head=SGDHead(lrs=(0.01,), batch_size=8),
    )  # fmt: skip
    assert shots_only["linear_by_shots"]["5"]["head"]["n_fit"] == 5


def test_multilabel_fewshot_takes_the_first_patients_of_each_class() -> None:
    """get_fewshot_in_nih: per class, the first `shots` patients whose every image has it;
    a patient already taken is skipped but uses up its place."""
    labels = ["A", "A|B", "B", "A", "B", "C", "A|C"]
    patients = ["p1", "p1", "p2", "p3", "p3", "p4", "p5"]
    f = make(np.zeros((7, 2)), labels)
    for r, p in zip(f.rows, patients, strict=True):
        r["patient"] = p
    # in common: p1 {A}, p2 {B}, p3 {}, p4 {C}, p5 {A, C}
    assert _patients_per_class(f, "y", 1, ["A", "B", "C"]).tolist() == [0, 1, 2, 5]
    # A: p1, p5; B: p2; C: p4, then p5 (taken: skipped)
    assert _patients_per_class(f, "y", 2, ["A", "B", "C"]).tolist() == [0, 1, 6, 2, 5]


def scholz_split(seed: int = 0) -> tuple[Features, Features, Features]:
    """Three overlapping classes in 6 dimensions: train 70 rows (7 choose C), val 20, test 30."""
    rng = np.random.default_rng(seed)

    def part(n: int) -> Features:
        y = rng.integers(0, 3, n)
        return make(rng.normal(size=(n, 6)) + 1.5 * np.eye(6)[y], [f"c{v}" for v in y])

    return part(70), part(20), part(30)


def test_scholz_linear_is_the_reference_c_sweep() -> None:
    """log_regression.py (daniel-scholz/mm-dinov2) written out: C over 10^linspace(-6, 5, 45),
    each fitted on train less the first tenth of torch.randperm (seed 0) and scored by MCC on
    that tenth, the first best C refitted on all of train, test scored once."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import matthews_corrcoef

    from radcache.embeddings.probes.logreg_reference import c_grid

    train, val, test = scholz_split()
    res = linear(train, val, test, "y", method="scholz2025", bootstrap=0)
    np.testing.assert_allclose(c_grid(), np.logspace(-6, 5, 45), rtol=1e-6)  # float32 values
    x, y = train.x.astype(np.float64), np.asarray([int(v[1]) for v in train.labels("y")])
    torch.manual_seed(0)
    perm = torch.randperm(len(x)).numpy()
    hold, rest = perm[: len(x) // 10], perm[len(x) // 10 :]
    best_c, best = 0.0, -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in (10 ** torch.linspace(-6, 5, 45)).tolist():
            fit = LogisticRegression(C=c, max_iter=1000, tol=1e-12).fit(x[rest], y[rest])
            mcc = matthews_corrcoef(y[hold], fit.predict_proba(x[hold]).argmax(axis=1))
            if mcc > best:  # MetricTracker: the first best
                best_c, best = c, mcc
        final = LogisticRegression(C=best_c, max_iter=1000, tol=1e-12).fit(x, y)
    grid = list(res["val_mcc_by_c"].values())
    assert len(grid) == 45 and max(grid) == pytest.approx(best) and grid.count(max(grid)) > 1
    # chosen from train alone (the loop above never sees val or test), among tied values
    assert res["c"] == best_c and res["c"] > 1e-6 and res["n_holdout"] == 7
    want = final.predict_proba(test.x.astype(np.float64))
    np.testing.assert_allclose(res["predictions"]["proba"], want, rtol=0, atol=1e-8)
    assert res["test"]["mcc"]["value"] == pytest.approx(
        matthews_corrcoef(res["predictions"]["y"], want.argmax(axis=1))
    )
    assert res["val"]["mcc"]["value"] == pytest.approx(  # the reference's "val" figure
        matthews_corrcoef([int(v[1]) for v in val.labels("y")], final.predict(val.x))
    )


def test_scholz_method_is_the_linear_probes_alone() -> None:
    train, val, test = scholz_split()
    for probe in (knn, fewshot):
        with pytest.raises(InputError, match="unknown method 'scholz2025'"):
            probe(train, val, test, "y", method="scholz2025")
    with pytest.raises(InputError, match="one label over its own 45 C"):
        linear(train, val, test, "y", method="scholz2025", cs=(1.0,))
    with pytest.raises(InputError, match="at least 10 training rows"):
        linear(train.take(range(9)), val, test, "y", method="scholz2025")
