"""Classification probes on :class:`Features`: kNN, linear and few-shot, each in two methods.

``method="radcache"`` (the default):

* :func:`knn` — L2-normalised features, cosine similarity, softmax-weighted vote with
  temperature 0.07 renormalised within each k (the same
  :func:`radcache.embeddings.search.knn_vote` the service uses), k ∈ {5, 20, 50, 100, 200};
* :func:`linear` — logistic regression on standardised features over a grid of C;
* :func:`fewshot` — n labelled examples per class, several random draws, kNN and
  logistic-regression heads, mean ± std.

``method="baharoon2023"``: the procedures of Baharoon et al. 2023's code
(MohammedSB/DINOv2ForRadiology, dinov2/eval/classification/): :func:`knn` as
``KnnModule`` (softmax over the top max(k) neighbours, partial sums per k:
:func:`~.neighbours.softmax_knn`) or, multi-label, ``MLkNN`` of dinov2/eval/utils.py;
:func:`linear` as linear.py (SGD heads on raw features over {last 1, last 4 blocks' CLS} ×
{with, without the mean patch token} × 4 learning rates); :func:`fewshot` as knn.py's
``n_per_class_list`` and linear.py's ``--shots``.

``method="scholz2025"`` (:func:`linear` only): MM-DINOv2's log_regression.py
(daniel-scholz/mm-dinov2), C chosen on a tenth of the training rows (:mod:`.logreg_reference`).

Every hyperparameter (k, C, learning rate, feature set) is chosen on the validation split;
the test split is scored once, at the chosen setting. A choice without validation rows is
an :class:`~radcache.embeddings.errors.InputError`.

Multi-label tasks (a label value is a ``|``-separated set of class names, as in
ChestX-ray14's ``Finding Labels``; :meth:`Features.label_sets`) take ``multilabel=True``:
:func:`knn` runs ML-kNN (:func:`~.neighbours.ml_knn`), :func:`linear` one head per class
(binary cross-entropy), both scored by macro AUROC (:func:`~.scoring.scores_multilabel`).
Seeds are fixed, so results are the same on every CPU run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np

from ..errors import InputError
from ..index import normalise
from ..search import TEMPERATURE, knn_vote
from .featureset import Features, Kind
from .logreg_reference import _proba, holdout_logreg
from .neighbours import SMOOTHING, _check_ml_knn, _ml_knn, _neighbours, softmax_knn
from .scoring import _mean, _per_class_auroc, scores
from .sgd import SGDHead, _linear_input, _sgd_linear
from .targets import (
    _cells,
    _encode,
    _evenly_spaced,
    _first_best,
    _in_order,
    _labelled_splits,
    _need_shots,
    _need_val,
    _patients_per_class,
    _per_class_draw,
    _predictions,
    _score,
    _targets,
)

__all__ = [
    "C_GRID",
    "KNN_KS",
    "METHODS",
    "REFERENCE_KINDS",
    "SHOTS",
    "Method",
    "fewshot",
    "knn",
    "linear",
]

KNN_KS = (5, 20, 50, 100, 200)
SHOTS = (1, 2, 4, 8, 16)
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)

Method = Literal["radcache", "baharoon2023", "scholz2025"]
METHODS: tuple[Method, ...] = ("radcache", "baharoon2023", "scholz2025")
# The feature kind each probe's method="baharoon2023" reads.
REFERENCE_KINDS: dict[str, Kind] = {
    "knn": "cls",
    "linear": "cls_last4+meanpatch",
    "fewshot": "cls_last4+meanpatch",
}


def _check_method(method: str, probe: str = "linear") -> None:
    known = METHODS if probe == "linear" else METHODS[:2]
    if method not in known:
        raise InputError(f"{probe}: unknown method {method!r}; expected one of {', '.join(known)}.")


# -- kNN -------------------------------------------------------------------------------------
def _knn_scores(
    queries: np.ndarray,
    support: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    ks: Sequence[int],
    *,
    temperature: float,
    multilabel: bool,
    method: Method,
) -> dict[int, np.ndarray]:
    """Class scores of each query for each k, from the ``support`` rows with targets ``y``."""
    reference = method == "baharoon2023"
    if multilabel:
        # MLkNN of the reference counts each training example among its own neighbours
        # (ignore_first_neighbours=0); radcache leaves it out, as Zhang & Zhou do.
        _check_ml_knn(min(ks), len(support), SMOOTHING)
        widest = min(max(ks), len(support) - (not reference))
        train_nn = _neighbours(support, support, widest, leave_self_out=not reference)
        test_nn = _neighbours(queries, support, widest)
        return {
            k: _ml_knn(train_nn[:, : min(k, widest)], test_nn[:, : min(k, widest)], y, SMOOTHING)
            for k in ks
        }
    if reference:
        return softmax_knn(queries, support, y, n_classes, ks, temperature)
    sims = normalise(queries) @ normalise(support).T
    names = [str(c) for c in range(n_classes)]
    vote = [names[c] for c in y]
    return {k: knn_vote(sims, vote, names, k=k, temperature=temperature) for k in ks}


def knn(
    train: Features,
    val: Features,
    test: Features,
    label: str,
    *,
    ks: Iterable[int] = KNN_KS,
    temperature: float = TEMPERATURE,
    bootstrap: int = 1000,
    multilabel: bool = False,
    method: Method = "radcache",
) -> dict[str, Any]:
    """Weighted kNN on cosine similarity: k chosen on ``val`` (``train`` the support), the
    test rows scored once at that k. ``multilabel``: label values are ``|``-separated class
    sets (:meth:`Features.label_sets`), ML-kNN instead of the vote.

    radcache: k by balanced accuracy (multi-label: macro AUROC), train + val the test
    rows' support. baharoon2023: the reference's scores (``KnnModule``: partial softmax
    sums, not renormalised; multi-label: ``MLkNN`` with each training example among its own
    neighbours), k by accuracy (multi-label: macro AUROC), and the support the reference
    uses, train alone (knn.py) or, multi-label, train + val (mlknn.py). The reference sweeps
    k on the test split without choosing: its figure for a k is this ``test`` at that k.
    ``predictions`` holds the test rows' scores."""
    _check_method(method, "knn")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise InputError(f"kNN needs k values ≥ 1; got {ks}.")
    tr, va, te = _labelled_splits("kNN", (train, val, test), label, multilabel=multilabel)
    _need_val(va, label, "k", len(ks), "a single k (-k K)")
    classes, (ytr, yva, yte) = _targets(label, (tr, va, te), multilabel)
    reference = method == "baharoon2023"
    metric = "macro_auroc" if multilabel else ("accuracy" if reference else "balanced_accuracy")

    def by_k(
        queries: np.ndarray, support: np.ndarray, y: np.ndarray, ks: Sequence[int]
    ) -> dict[int, np.ndarray]:
        return _knn_scores(
            queries, support, y, len(classes), ks,
            temperature=temperature, multilabel=multilabel, method=method,
        )  # fmt: skip

    val_by_k: dict[str, Any] = {}
    k = ks[0]
    if len(ks) > 1:
        val_by_k = {
            str(k): _score(yva, p, classes, multilabel, 0, reference)
            for k, p in by_k(va.x, tr.x, ytr, ks).items()
        }
        k = int(_first_best({k: v[metric]["value"] for k, v in val_by_k.items()}))
    sup, ysup = tr, ytr
    if not reference or multilabel:
        sup, ysup = Features.concat([tr, va]), np.concatenate([ytr, yva])
    # the reference's softmax spans the top max(ks), whichever k is scored
    proba = by_k(te.x, sup.x, ysup, ks if reference and not multilabel else [k])[k]
    vote: dict[str, Any] = (
        {"vote": "ml-knn", "smoothing": SMOOTHING}
        if multilabel
        else {"vote": "softmax-partial-sums" if reference else "weighted-vote"}
        | {"temperature": temperature}
    )
    return {
        "protocol": "knn",
        "method": method,
        "label": label,
        "multilabel": multilabel,
        "classes": classes,
        **vote,
        "n_train": len(tr),
        "n_val": len(va),
        "n_test": len(te),
        "n_support": len(sup),
        "ks": ks,
        "selected_by": f"validation {metric}",
        "val_by_k": val_by_k,
        "k": k,
        "test": _score(yte, proba, classes, multilabel, bootstrap, reference),
        "predictions": _predictions(te, classes, yte, proba),
    }


# -- linear: radcache ------------------------------------------------------------------------
def _logreg(x: np.ndarray, y: np.ndarray, c: float, seed: int, multilabel: bool = False) -> Any:
    """Standardised features, logistic regression; ``multilabel`` (``y`` an indicator
    matrix): one per class, each fitted by binary cross-entropy."""
    import warnings

    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed)
    )
    if not multilabel:
        return model.fit(x, y)
    with warnings.catch_warnings():
        # a class no training row has (or every row has) is predicted as that constant
        warnings.filterwarnings("ignore", "Label .* is present in all training examples")
        return OneVsRestClassifier(model).fit(x, y)


def _linear_logreg(
    tr: Features,
    va: Features,
    te: Features,
    label: str,
    *,
    cs: Sequence[float],
    seed: int,
    bootstrap: int,
    multilabel: bool,
) -> dict[str, Any]:
    from sklearn.metrics import balanced_accuracy_score

    classes, (ytr, yva, yte) = _targets(label, (tr, va, te), multilabel)
    grid = {}
    for c in cs if len(va) else ():
        model = _logreg(tr.x, ytr, c, seed, multilabel)
        if multilabel:
            grid[str(c)] = _mean(_per_class_auroc(yva, _proba(model, va.x, len(classes))))
        else:
            grid[str(c)] = float(balanced_accuracy_score(yva, model.predict(va.x)))
    # ties: the stronger regulariser
    best = (
        max(grid, key=lambda c: (np.nan_to_num(grid[c], nan=-np.inf), -float(c)))
        if grid
        else str(cs[0])
    )
    x, y = np.concatenate([tr.x, va.x]), np.concatenate([ytr, yva])
    proba = _proba(_logreg(x, y, float(best), seed, multilabel), te.x, len(classes))
    return {
        "classes": classes,
        f"val_{'macro_auroc' if multilabel else 'balanced_accuracy'}_by_c": grid,
        "c": float(best),
        "test": _score(yte, proba, classes, multilabel, bootstrap, False),
        "predictions": _predictions(te, classes, yte, proba),
    }


def linear(
    train: Features,
    val: Features,
    test: Features,
    label: str,
    *,
    cs: Iterable[float] = C_GRID,
    seed: int = 0,
    bootstrap: int = 1000,
    multilabel: bool = False,
    method: Method = "radcache",
    head: SGDHead | None = None,
) -> dict[str, Any]:
    """A linear probe: settings chosen on ``val``, refit on train + val, scored once on
    ``test``. ``multilabel``: label values are ``|``-separated class sets
    (:meth:`Features.label_sets`), one head per class, chosen by macro AUROC.

    radcache: standardised features, logistic regression, C from ``cs`` by balanced
    accuracy. baharoon2023: linear.py's procedure (:class:`SGDHead`, ``head``) on
    ``cls_last4+meanpatch`` features; probabilities are the sigmoid of each logit, as the
    reference scores them (for more than two classes they need not sum to 1).
    scholz2025 (single-label, no ``cs``): raw features, C over 45 values chosen by MCC on
    a tenth of ``train`` (val is scored, not used), refit on train, train rows in entry order
    (:mod:`.logreg_reference`). ``predictions`` holds the test rows' probabilities."""
    _check_method(method)
    tr, va, te = _labelled_splits("linear", (train, val, test), label, multilabel=multilabel)
    if method == "scholz2025":
        if multilabel or cs is not C_GRID:
            raise InputError(
                "method 'scholz2025' fits one label over its own 45 C: leave out cs and multilabel."
            )
        body = holdout_logreg(_in_order(tr), va, te, label, seed=seed, bootstrap=bootstrap)
    elif method == "baharoon2023":
        tr, va = _in_order(tr), _in_order(va)  # batches index rows by entry, not ingest order
        body = _sgd_linear(
            tr, va, te, Features.concat([tr, va]), label, head=head or SGDHead(), seed=seed,
            bootstrap=bootstrap, multilabel=multilabel,
        )  # fmt: skip
    else:
        cs = list(cs)
        _need_val(va, label, "C", len(cs), "a single C (cs=(C,))")
        body = _linear_logreg(
            tr, va, te, label, cs=cs, seed=seed, bootstrap=bootstrap, multilabel=multilabel
        )
    return {
        "protocol": "linear",
        "method": method,
        "label": label,
        "multilabel": multilabel,
        "n_train": len(tr),
        "n_val": len(va),
        "n_test": len(te),
        **body,
    }


# -- few-shot --------------------------------------------------------------------------------
def _mean_std(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {
        m: {
            "mean": float(np.nanmean([r[m] for r in runs])),
            "std": float(np.nanstd([r[m] for r in runs])),
        }
        for m in runs[0]
    }


def _fewshot_logreg(
    pool: Features,
    te: Features,
    label: str,
    *,
    shots: Iterable[int],
    draws: int,
    k: int,
    c: float,
    seed: int,
) -> dict[str, Any]:
    ytr = pool.labels(label)
    classes = sorted(set(ytr) | set(te.labels(label)))
    yte = _encode(te.labels(label), classes)
    rng = np.random.default_rng(seed)
    by_class = {cl: np.flatnonzero(ytr == cl) for cl in sorted(set(ytr))}
    out: dict[str, Any] = {}
    shots = list(shots)
    fewest = _need_shots({cl: len(v) for cl, v in by_class.items()}, min(shots), label)
    for n in shots:
        if n > fewest:  # left out: the report lists the shots it has
            continue
        runs: dict[str, list[dict[str, float]]] = {"knn": [], "logreg": []}
        for _ in range(draws):
            pick = np.concatenate([rng.choice(v, n, replace=False) for v in by_class.values()])
            sup = pool.take(pick)
            ysup = sup.labels(label)
            sims = normalise(te.x) @ normalise(sup.x).T
            p_knn = knn_vote(sims, list(ysup), classes, k=k, temperature=TEMPERATURE)
            model = _logreg(sup.x, _encode(ysup, classes), c, seed)
            p_lr = _proba(model, te.x, len(classes))
            for name, p in (("knn", p_knn), ("logreg", p_lr)):
                runs[name].append(_cells(scores(yte, p, bootstrap=0)))
        out[str(n)] = {name: _mean_std(rs) for name, rs in runs.items()}
    return {"classes": classes, "draws": draws, "k": k, "by_shots": out}


def _fewshot_reference(
    tr: Features,
    va: Features,
    te: Features,
    label: str,
    *,
    shots: Iterable[int],
    draws: int,
    ks: Sequence[int],
    seed: int,
    multilabel: bool,
    head: SGDHead,
    refit_with_val: bool,
) -> dict[str, Any]:
    tr, va = _in_order(tr), _in_order(va)
    classes, (ytr, _, yte) = _targets(label, (tr, va, te), multilabel)
    out: dict[str, Any] = {}
    linear_runs: dict[str, Any] = {}
    knn_x = (tr.x, te.x)
    if tr.kind == "cls_last4+meanpatch":
        knn_x = (_linear_input(tr, 1, False), _linear_input(te, 1, False))
    for n in shots:
        cell: dict[str, Any] = {}
        if not multilabel:
            k_list = sorted(k for k in {*ks, n} if k <= n)
            runs: dict[int, list[dict[str, float]]] = {k: [] for k in k_list}
            for t in range(draws):
                pick = _per_class_draw(ytr, len(classes), n, seed + t)
                p = softmax_knn(
                    knn_x[1], knn_x[0][pick], ytr[pick], len(classes), k_list, TEMPERATURE
                )
                for k in k_list:
                    runs[k].append(_cells(scores(yte, p[k], bootstrap=0, raw=True)))
            cell |= {f"knn k={k}": _mean_std(rs) for k, rs in runs.items()}
        pick = (
            _patients_per_class(tr, label, n, classes) if multilabel else _evenly_spaced(len(tr), n)
        )
        if not len(pick):
            raise InputError(
                f"{n} shots select no training rows labelled {label!r}"
                + (" (no patient has a class on every row)." if multilabel else ".")
            )
        shot = tr.take(pick)
        fit = Features.concat([shot, va]) if refit_with_val else shot
        res = _sgd_linear(
            shot, va, te, fit, label, head=head, seed=seed, bootstrap=0, multilabel=multilabel
        )
        cell["linear"] = {m: {"mean": v, "std": 0.0} for m, v in _cells(res["test"]).items()}
        linear_runs[str(n)] = {
            k: v for k, v in res.items() if k not in ("test", "predictions", "classes")
        }
        out[str(n)] = cell
    how = "the first n patients of each class" if multilabel else "n rows in total, evenly spaced"
    return {
        "classes": classes,
        "draws": draws,
        "ks": list(ks),
        "note": (
            ("" if multilabel else f"knn: n rows per class, {draws} draws, mean ± std; ")
            + f"linear: {how}, one draw"
            + (", retrained with the validation rows." if refit_with_val else ".")
        ),
        "by_shots": out,
        "linear_by_shots": linear_runs,
    }


def fewshot(
    train: Features,
    val: Features,
    test: Features,
    label: str,
    *,
    shots: Iterable[int] = SHOTS,
    draws: int = 5,
    k: int = 20,
    c: float = 1.0,
    seed: int = 0,
    multilabel: bool = False,
    method: Method = "radcache",
    ks: Iterable[int] = KNN_KS,
    head: SGDHead | None = None,
    refit_with_val: bool = False,
) -> dict[str, Any]:
    """Few labelled examples; mean and std of every metric over the draws; nothing is
    chosen on test.

    radcache: n examples per class drawn ``draws`` times from train + val (nothing is
    chosen, so validation rows are examples too), kNN (``k``) and logistic-regression
    (``c``) heads. Single-label only.

    baharoon2023: knn.py's few-shot kNN (single-label): n rows per class from train, drawn
    with torch seeds ``seed`` … ``seed + draws - 1``, scores for each k of ``ks`` up to n and
    for k = n (:func:`~.neighbours.softmax_knn`); and linear.py's ``--shots`` head: n rows
    of train in total, evenly spaced (multi-label: the first n patients of each class, as
    for ChestX-ray14), one draw, its setting chosen on ``val`` (``head``), retrained on the
    same rows (``refit_with_val``: with every validation row added, which is what
    linear.py's ``shots == None or num_samples == None`` does when ``num_samples`` is unset)
    and scored on test. Draws take train rows by entry key, not ingest order."""
    _check_method(method, "fewshot")
    shots = list(shots)
    if min(shots, default=0) < 1:
        raise InputError(f"few-shot needs shots ≥ 1; got {shots}.")
    tr, va, te = _labelled_splits("few-shot", (train, val, test), label, multilabel=multilabel)
    if method == "baharoon2023":
        body = _fewshot_reference(
            tr, va, te, label, shots=shots, draws=draws, ks=sorted(set(ks)), seed=seed,
            multilabel=multilabel, head=head or SGDHead(), refit_with_val=refit_with_val,
        )  # fmt: skip
    elif multilabel:
        raise InputError(
            "few-shot draws n examples per class, which label sets do not define (one row "
            "counts for several classes); use knn or linear with multilabel=True, or "
            "method='baharoon2023' (n patients per class)."
        )
    else:
        pool = Features.concat([tr, va])
        body = _fewshot_logreg(pool, te, label, shots=shots, draws=draws, k=k, c=c, seed=seed)
    return {
        "protocol": "fewshot",
        "method": method,
        "label": label,
        "multilabel": multilabel,
        "n_test": len(te),
        **body,
    }
