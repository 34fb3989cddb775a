"""Scholz et al. 2025's classifier (``method="scholz2025"`` of :func:`~.protocols.linear`), as
``eval_log_regression`` of dinov2/eval/log_regression.py in github.com/daniel-scholz/mm-dinov2
runs it on frozen features.

* Features as they are: no standardisation (the reference fits on the CLS token in float64).
* C over :func:`c_grid`, ``10 ** torch.linspace(-6, 5, 45)`` (float32, as torch gives it).
* For each C, L2 logistic regression fitted on nine tenths of the training rows and scored by
  MCC on the other tenth: the first ``n // 10`` rows of ``torch.randperm(n)`` after
  ``torch.manual_seed(0)`` (not stratified; the val split is not used). The first best C
  wins ties (torchmetrics' ``MetricTracker``: the smallest C).
* Refit at that C on every training row; val and test scored once each (the reference
  reports both; neither takes part in any choice).

The reference fits cuML's ``LogisticRegression(penalty="l2", C, max_iter=1000, tol=1e-12,
linesearch_max_iter=50)``: L-BFGS from zero weights (5 correction pairs) on the mean loss
plus ``||W||² / (2 C n)``, intercept unpenalised, softmax for more than two classes and a
sigmoid for two. scikit-learn's ``LogisticRegression(C, max_iter=1000, tol=1e-12)``
minimises the same objective with scipy's L-BFGS-B (10 correction pairs, 50 line-search
steps); both stop at the optimum or after 1000 iterations, so probabilities agree to the
solvers' precision, not bit for bit.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ..errors import InputError
from .featureset import Features
from .targets import _first_best, _predictions, _score, _targets

__all__ = ["HOLDOUT", "MAX_ITER", "TOL", "c_grid", "holdout_logreg"]

HOLDOUT = 10  # one training row in HOLDOUT chooses C
MAX_ITER = 1000  # log_regression.py DEFAULT_MAX_ITER
TOL = 1e-12  # LogRegModule's tol


def c_grid() -> list[float]:
    """The 45 values of C: ``10 ** torch.linspace(-6, 5, 45)``, float32 as the reference
    computes them (``C_POWER_RANGE``), each as a Python float."""
    import torch

    return [float(c) for c in (10 ** torch.linspace(-6, 5, 45)).tolist()]


def _holdout(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows that choose C and those fitted meanwhile: ``torch.randperm(n)`` with the torch
    seed ``seed``, its first ``n // 10`` and the rest."""
    import torch

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return perm[: n // HOLDOUT], perm[n // HOLDOUT :]


def _proba(model: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over all ``n_classes`` (0 for a class the model never saw)."""
    p = np.zeros((len(x), n_classes))
    p[:, model.classes_] = model.predict_proba(x)
    return p


def _fit(x: np.ndarray, y: np.ndarray, c: float) -> Any:
    """L2 logistic regression on raw float64 features, run to the reference's limits."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # 1000 iterations, as cuML
        return LogisticRegression(C=c, max_iter=MAX_ITER, tol=TOL).fit(x.astype(np.float64), y)


def holdout_logreg(
    tr: Features, va: Features, te: Features, label: str, *, seed: int, bootstrap: int
) -> dict[str, Any]:
    """The reference's procedure on labelled rows (``tr`` in the order the draw permutes);
    ``seed`` is the torch seed of the draw (the reference's is 0)."""
    from sklearn.metrics import matthews_corrcoef
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency

    classes, (ytr, yva, yte) = _targets(label, (tr, va, te), False)
    hold, fit = _holdout(len(tr), seed)
    if not len(hold) or len(np.unique(ytr[fit])) < 2:
        raise InputError(
            f"C is chosen on a tenth of the training rows, fitted on the rest: {len(tr)} rows "
            f"labelled {label!r} leave {len(hold)} to choose with and {len(np.unique(ytr[fit]))} "
            "class(es) to fit; give at least 10 training rows and two classes."
        )
    grid = {}
    # one BLAS thread: on probe-sized matrices more threads cost more than they give
    with threadpool_limits(1, user_api="blas"):
        for c in c_grid():
            p = _proba(_fit(tr.x[fit], ytr[fit], c), tr.x[hold], len(classes))
            grid[f"{c:.4g}"] = float(matthews_corrcoef(ytr[hold], p.argmax(axis=1)))
        c = c_grid()[list(grid).index(_first_best(grid))]
        model = _fit(tr.x, ytr, c)
    proba = _proba(model, te.x, len(classes))
    val = _score(yva, _proba(model, va.x, len(classes)), classes, False, 0, True) if len(va) else {}
    return {
        "classes": classes,
        "selected_by": f"MCC on {len(hold)} of the training rows (torch.randperm, seed {seed})",
        "n_holdout": len(hold),
        "val_mcc_by_c": grid,
        "c": c,
        "val": val,
        "test": _score(yte, proba, classes, False, bootstrap, True),
        "predictions": _predictions(te, classes, yte, proba),
    }
