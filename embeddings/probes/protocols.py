"""Protocols of the DINOv2-on-radiology study (Baharoon et al. 2023) on :class:`Features`:

* :func:`knn` — L2-normalised features, cosine similarity, softmax-weighted vote with
  temperature 0.07 (the same :func:`radcache.embeddings.search.knn_vote` the service uses),
  k swept over {5, 20, 50, 100, 200};
* :func:`fewshot` — n labelled examples per class, several random draws, kNN and
  logistic-regression heads, mean ± std;
* :func:`linear` — logistic regression on standardised features, C chosen on the
  validation split from a grid, retrained on train + val, scored once on test.

Multi-label tasks (a label value is a ``|``-separated set of class names, as in
ChestX-ray14's ``Finding Labels``; :meth:`Features.label_sets`) take ``multilabel=True``:
:func:`knn` runs ML-kNN (:func:`~.neighbours.ml_knn`), :func:`linear` one logistic
regression per class (binary cross-entropy), both scored by macro AUROC
(:func:`~.metrics.scores_multilabel`). Seeds are fixed, so results are the same on every
CPU run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..index import normalise
from ..search import TEMPERATURE, knn_vote
from .featureset import Features
from .neighbours import SMOOTHING, _check_ml_knn, _ml_knn, _neighbours
from .scoring import _mean, _per_class_auroc, scores, scores_multilabel

__all__ = ["C_GRID", "KNN_KS", "SHOTS", "fewshot", "knn", "linear"]

KNN_KS = (5, 20, 50, 100, 200)
SHOTS = (1, 2, 4, 8, 16)
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def _encode(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    col = {c: i for i, c in enumerate(classes)}
    return np.asarray([col[v] for v in labels])


def _targets(
    label: str, parts: Sequence[Features], multilabel: bool
) -> tuple[list[str], list[np.ndarray]]:
    """The classes of ``label`` over ``parts`` (labelled rows only) and, per part, class
    indices or (multi-label) a 0/1 indicator matrix."""
    if not multilabel:
        classes = sorted({str(v) for f in parts for v in f.labels(label)})
        return classes, [_encode(f.labels(label), classes) for f in parts]
    sets = [[s or frozenset() for s in f.label_sets(label)] for f in parts]
    classes = sorted(frozenset().union(*(s for part in sets for s in part)))
    col = {c: i for i, c in enumerate(classes)}
    ys = []
    for part in sets:
        y = np.zeros((len(part), len(classes)), np.int64)
        for r, s in enumerate(part):
            y[r, [col[c] for c in s]] = 1
        ys.append(y)
    return classes, ys


def _predictions(
    f: Features, classes: Sequence[str], y: np.ndarray, proba: np.ndarray
) -> dict[str, Any]:
    """Per test row: its target and probabilities, and where it came from (for ROC curves
    and confusion matrices)."""
    return {
        "classes": list(classes),
        "y": y.tolist(),
        "proba": proba.tolist(),
        "entries": [r["entry"] for r in f.rows],
        "slices": [r["slice"] for r in f.rows],
    }


# -- protocols -------------------------------------------------------------------------------
def knn(
    train: Features,
    test: Features,
    label: str,
    *,
    ks: Iterable[int] = KNN_KS,
    temperature: float = TEMPERATURE,
    bootstrap: int = 1000,
    multilabel: bool = False,
) -> dict[str, Any]:
    """Weighted kNN on cosine similarity, for each k; figures per k, the best k by balanced
    accuracy. ``multilabel``: label values are ``|``-separated class sets
    (:meth:`Features.label_sets`), ML-kNN (:func:`ml_knn`) instead of the vote, the best k
    by macro AUROC. ``predictions`` holds the test rows' probabilities at the best k."""
    tr, te = train.labelled(label), test.labelled(label)
    classes, (ytr, yte) = _targets(label, (tr, te), multilabel)
    ks = list(ks)
    if multilabel:
        _check_ml_knn(min(ks, default=0), len(tr), SMOOTHING)
        widest = min(max(ks), len(tr) - 1)
        train_nn = _neighbours(tr.x, tr.x, widest, leave_self_out=True)
        test_nn = _neighbours(te.x, tr.x, widest)
        probas = {
            k: _ml_knn(train_nn[:, : min(k, widest)], test_nn[:, : min(k, widest)], ytr, SMOOTHING)
            for k in ks
        }
        per_k = {
            str(k): scores_multilabel(yte, p, classes, bootstrap=bootstrap)
            for k, p in probas.items()
        }
        method = {"method": "ml-knn", "smoothing": SMOOTHING}
    else:
        sims = normalise(te.x) @ normalise(tr.x).T
        vote = list(tr.labels(label))
        probas = {k: knn_vote(sims, vote, classes, k=k, temperature=temperature) for k in ks}
        per_k = {str(k): scores(yte, p, bootstrap=bootstrap) for k, p in probas.items()}
        method = {"method": "weighted-vote", "temperature": temperature}
    metric = "macro_auroc" if multilabel else "balanced_accuracy"
    best = max(per_k, key=lambda k: np.nan_to_num(per_k[k][metric]["value"], nan=-np.inf))
    return {
        "protocol": "knn",
        "label": label,
        "multilabel": multilabel,
        "classes": classes,
        **method,
        "n_train": len(tr),
        "n_test": len(te),
        "by_k": per_k,
        "best_k": int(best),
        "predictions": _predictions(te, classes, yte, probas[int(best)]),
    }


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


def _proba(model: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    p = np.zeros((len(x), n_classes))
    p[:, model.classes_] = model.predict_proba(x)
    return p


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
) -> dict[str, Any]:
    """Logistic regression: C chosen on ``val`` (balanced accuracy), refit on train + val,
    scored once on ``test``. ``multilabel``: label values are ``|``-separated class sets
    (:meth:`Features.label_sets`), one regression per class, C chosen by macro AUROC.
    ``predictions`` holds the test rows' probabilities."""
    from sklearn.metrics import balanced_accuracy_score

    tr, va, te = train.labelled(label), val.labelled(label), test.labelled(label)
    classes, (ytr, yva, yte) = _targets(label, (tr, va, te), multilabel)
    grid = {}
    for c in cs:
        model = _logreg(tr.x, ytr, c, seed, multilabel)
        if not len(va):
            grid[str(c)] = 0.0
        elif multilabel:
            grid[str(c)] = _mean(_per_class_auroc(yva, _proba(model, va.x, len(classes))))
        else:
            grid[str(c)] = float(balanced_accuracy_score(yva, model.predict(va.x)))
    # ties: the stronger regulariser
    best = max(grid, key=lambda c: (np.nan_to_num(grid[c], nan=-np.inf), -float(c)))
    x, y = np.concatenate([tr.x, va.x]), np.concatenate([ytr, yva])
    proba = _proba(_logreg(x, y, float(best), seed, multilabel), te.x, len(classes))
    test_scores = (
        scores_multilabel(yte, proba, classes, bootstrap=bootstrap)
        if multilabel
        else scores(yte, proba, bootstrap=bootstrap)
    )
    return {
        "protocol": "linear",
        "label": label,
        "multilabel": multilabel,
        "classes": classes,
        "n_train": len(tr),
        "n_val": len(va),
        "n_test": len(te),
        f"val_{'macro_auroc' if multilabel else 'balanced_accuracy'}_by_c": grid,
        "c": float(best),
        "test": test_scores,
        "predictions": _predictions(te, classes, yte, proba),
    }


def fewshot(
    train: Features,
    test: Features,
    label: str,
    *,
    shots: Iterable[int] = SHOTS,
    draws: int = 5,
    k: int = 20,
    c: float = 1.0,
    seed: int = 0,
    multilabel: bool = False,
) -> dict[str, Any]:
    """n labelled examples per class (``draws`` random draws each), kNN and logistic
    regression heads; mean and std of every metric over the draws. Single-label only."""
    if multilabel:
        raise InputError(
            "few-shot draws n examples per class, which label sets do not define (one row "
            "counts for several classes); use knn or linear with multilabel=True."
        )
    tr, te = train.labelled(label), test.labelled(label)
    ytr = tr.labels(label)
    classes = sorted(set(ytr) | set(te.labels(label)))
    yte = _encode(te.labels(label), classes)
    rng = np.random.default_rng(seed)
    by_class = {cl: np.flatnonzero(ytr == cl) for cl in sorted(set(ytr))}
    out: dict[str, Any] = {}
    for n in shots:
        if any(len(v) < n for v in by_class.values()):
            continue
        runs: dict[str, list[dict[str, float]]] = {"knn": [], "logreg": []}
        for _ in range(draws):
            pick = np.concatenate([rng.choice(v, n, replace=False) for v in by_class.values()])
            sup = tr.take(pick)
            ysup = sup.labels(label)
            sims = normalise(te.x) @ normalise(sup.x).T
            p_knn = knn_vote(sims, list(ysup), classes, k=k, temperature=TEMPERATURE)
            model = _logreg(sup.x, _encode(ysup, classes), c, seed)
            p_lr = _proba(model, te.x, len(classes))
            for head, p in (("knn", p_knn), ("logreg", p_lr)):
                runs[head].append({m: v["value"] for m, v in scores(yte, p, bootstrap=0).items()})
        out[str(n)] = {
            head: {
                m: {
                    "mean": float(np.nanmean([r[m] for r in rs])),
                    "std": float(np.nanstd([r[m] for r in rs])),
                }
                for m in rs[0]
            }
            for head, rs in runs.items()
        }
    return {
        "protocol": "fewshot",
        "label": label,
        "classes": classes,
        "draws": draws,
        "k": k,
        "n_test": len(te),
        "by_shots": out,
    }
