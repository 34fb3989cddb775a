"""Metrics: :func:`scores` (single-label) and :func:`scores_multilabel`, each metric from
scikit-learn (one implementation each) with a bootstrap 95 % interval over resampled rows."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError

__all__ = ["Metric", "scores", "scores_multilabel"]

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]  # (y, proba, prediction)


def _metric_fns(raw: bool = False) -> dict[str, Metric]:
    from sklearn import metrics as m

    def auroc(y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> float:
        present = np.unique(y)
        if len(present) < 2:
            return float("nan")
        if p.shape[1] == 2:
            return float(m.roc_auc_score(y, p[:, 1]))
        if raw:
            return _mean(_per_class_auroc(np.eye(p.shape[1], dtype=np.int64)[y], p))
        cols = p[:, present] / np.clip(p[:, present].sum(axis=1, keepdims=True), 1e-12, None)
        return float(m.roc_auc_score(y, cols, multi_class="ovr", average="macro", labels=present))

    return {
        "accuracy": lambda y, p, pred: float(m.accuracy_score(y, pred)),
        "balanced_accuracy": lambda y, p, pred: float(m.balanced_accuracy_score(y, pred)),
        "macro_auroc": auroc,
        "mcc": lambda y, p, pred: float(m.matthews_corrcoef(y, pred)),
        "macro_f1": lambda y, p, pred: float(m.f1_score(y, pred, average="macro")),
    }


def _per_class_auroc(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """AUROC of each column of an indicator matrix; NaN where a column holds one value."""
    from sklearn.metrics import roc_auc_score

    out = np.full(y.shape[1], np.nan)
    keep = (y.sum(axis=0) > 0) & (y.sum(axis=0) < len(y))
    if keep.any():
        out[keep] = np.atleast_1d(roc_auc_score(y[:, keep], proba[:, keep], average=None))
    return out


def _mean(values: np.ndarray) -> float:
    """Mean of the finite values (NaN if none)."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def _multilabel_metric_fns() -> dict[str, Metric]:
    from sklearn import metrics as m

    def mean_ap(y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> float:
        keep = y.any(axis=0)
        if not keep.any():
            return float("nan")
        return _mean(np.atleast_1d(m.average_precision_score(y[:, keep], p[:, keep], average=None)))

    return {
        "macro_auroc": lambda y, p, pred: _mean(_per_class_auroc(y, p)),
        "macro_f1": lambda y, p, pred: float(m.f1_score(y, pred, average="macro", zero_division=0)),
        "mean_ap": mean_ap,
    }


def _with_intervals(
    fns: Mapping[str, Metric],
    y: np.ndarray,
    proba: np.ndarray,
    pred: np.ndarray,
    *,
    bootstrap: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """Each metric with a bootstrap 95 % interval over resampled rows."""
    import warnings

    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(y), len(y)) for _ in range(bootstrap)]
    out = {}
    for name, fn in fns.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one-class resamples: undefined, left out
            value = fn(y, proba, pred)
            boot = [fn(y[d], proba[d], pred[d]) for d in draws]
        boot_arr = np.asarray([b for b in boot if np.isfinite(b)])
        low, high = np.percentile(boot_arr, [2.5, 97.5]) if len(boot_arr) else (np.nan, np.nan)
        out[name] = {"value": value, "low": float(low), "high": float(high)}
    return out


def scores(
    y: np.ndarray, proba: np.ndarray, *, bootstrap: int = 1000, seed: int = 0, raw: bool = False
) -> dict[str, dict[str, float]]:
    """Each metric with a bootstrap 95 % interval: ``{name: {value, low, high}}``.

    ``y`` holds class indices, ``proba`` per-class probabilities (rows sum to 1). With
    ``raw``, ``proba`` holds per-class scores that need not sum to 1 (sigmoid outputs, kNN
    partial sums): macro AUROC is then the mean one-vs-rest AUROC of each class's own column,
    as torchmetrics' ``MulticlassAUROC`` computes it; two classes score column 1 either way."""
    pred = proba.argmax(axis=1)
    return _with_intervals(_metric_fns(raw), y, proba, pred, bootstrap=bootstrap, seed=seed)


def scores_multilabel(
    y: np.ndarray,
    proba: np.ndarray,
    classes: Sequence[str] | None = None,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Multi-label metrics with bootstrap 95 % intervals: ``macro_auroc`` (over the classes
    with positives and negatives), ``macro_f1`` (threshold 0.5) and ``mean_ap`` (macro average
    precision, over the classes with positives), each ``{value, low, high}``; and
    ``per_class_auroc`` (``{class: value}``, NaN where undefined).

    ``y`` is an (n, classes) 0/1 indicator matrix, ``proba`` per-class probabilities."""
    y, proba = np.asarray(y), np.asarray(proba, dtype=np.float64)
    if y.ndim != 2 or y.shape != proba.shape:
        raise InputError(
            f"scores_multilabel needs y and proba of the same (n, classes) shape; got "
            f"{y.shape} and {proba.shape}."
        )
    names = list(classes) if classes is not None else [str(j) for j in range(y.shape[1])]
    out = _with_intervals(
        _multilabel_metric_fns(), y, proba, proba > 0.5, bootstrap=bootstrap, seed=seed
    )
    per_class = _per_class_auroc(y, proba)
    out["per_class_auroc"] = {c: float(v) for c, v in zip(names, per_class, strict=True)}
    return out
