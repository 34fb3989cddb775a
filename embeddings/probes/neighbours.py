"""Nearest neighbours on cosine similarity: the softmax vote of the DINOv2 evaluation
(:func:`softmax_knn`), and ML-kNN (:func:`ml_knn`) for multi-label tasks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError
from ..index import normalise

__all__ = ["SMOOTHING", "ml_knn", "softmax_knn"]

SMOOTHING = 1.0  # ML-kNN's Laplace smoothing s (Zhang & Zhou 2007)


def _ranked(sims: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` largest values of each row, largest first."""
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def _neighbours(
    queries: np.ndarray, support: np.ndarray, k: int, *, leave_self_out: bool = False
) -> np.ndarray:
    """The ``k`` most cosine-similar support rows of each query, nearest first, computed in
    blocks of queries; with ``leave_self_out`` the queries are the support and row i never
    lists itself."""
    q, x = normalise(queries), normalise(support)
    out = np.empty((len(q), k), np.int64)
    block = 2048
    for a in range(0, len(q), block):
        sims = q[a : a + block] @ x.T
        if leave_self_out:
            rows = np.arange(len(sims))
            sims[rows, a + rows] = -np.inf
        out[a : a + block] = _ranked(sims, k)
    return out


def softmax_knn(
    queries: np.ndarray,
    support: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    ks: Sequence[int],
    temperature: float,
) -> dict[int, np.ndarray]:
    """Class scores of each query for every k in ``ks``, as the DINOv2 kNN evaluation
    computes them (``KnnModule.forward`` in dinov2/eval/classification/knn.py of
    MohammedSB/DINOv2ForRadiology): features L2-normalised, dot products, a softmax of
    similarity / ``temperature`` over the top ``max(ks)`` neighbours (at most the support
    size), and for each k the partial sum of those weights per class over the k nearest.

    The partial sums are not renormalised: a row sums to the softmax mass of its k nearest
    (1 only at k = max(ks)), so a k below the largest gives the same argmax as a vote
    renormalised within k, but other scores. ``labels`` are class indices of ``support``."""
    ks = [int(k) for k in ks]
    widest = min(max(ks), len(support))
    q, x = normalise(queries), normalise(support)
    labels = np.asarray(labels, dtype=np.int64)
    out = {k: np.zeros((len(q), n_classes)) for k in ks}
    if widest < 1:
        return out
    block = 2048
    for a in range(0, len(q), block):
        sims = np.asarray(q[a : a + block] @ x.T, dtype=np.float64)
        top = _ranked(sims, widest)
        s = np.take_along_axis(sims, top, axis=1) / temperature
        w = np.exp(s - s[:, :1])  # shifted by the row maximum (the nearest): same softmax
        w /= w.sum(axis=1, keepdims=True)
        lab = labels[top]
        for c in range(n_classes):
            running = np.cumsum(np.where(lab == c, w, 0.0), axis=1)
            for k in ks:
                out[k][a : a + block, c] = running[:, min(k, widest) - 1]
    return out


def _ml_knn(train_nn: np.ndarray, test_nn: np.ndarray, train_y: np.ndarray, s: float) -> np.ndarray:
    """ML-kNN posteriors from neighbour indices (train: leave-one-out; k = their width)."""
    y = np.asarray(train_y, dtype=np.int64)
    n, n_classes = y.shape
    k = train_nn.shape[1]

    def counts(nn: np.ndarray) -> np.ndarray:  # neighbours carrying each class
        c = np.zeros((len(nn), n_classes), np.int64)
        for j in range(k):
            c += y[nn[:, j]]
        return c

    prior = (s + y.sum(axis=0)) / (2 * s + n)
    cell = (np.arange(n_classes) * (k + 1) + counts(train_nn)).ravel()
    with_c, without_c = (
        np.bincount(cell, weights=w.ravel(), minlength=n_classes * (k + 1)).reshape(n_classes, -1)
        for w in (y, 1 - y)
    )
    like1 = (s + with_c) / (s * (k + 1) + with_c.sum(axis=1, keepdims=True))
    like0 = (s + without_c) / (s * (k + 1) + without_c.sum(axis=1, keepdims=True))
    ct, cols = counts(test_nn), np.arange(n_classes)
    p1, p0 = prior * like1[cols, ct], (1 - prior) * like0[cols, ct]
    return np.asarray(p1 / (p1 + p0))


def ml_knn(
    sims: np.ndarray,
    train_sims: np.ndarray,
    train_y: np.ndarray,
    k: int,
    s: float = SMOOTHING,
) -> np.ndarray:
    """ML-kNN (Zhang & Zhou 2007): the posterior probability of each class for each query.

    ``sims`` (queries × train) and ``train_sims`` (train × train) are similarities (cosine,
    on L2-normalised features), ``train_y`` a (train, classes) 0/1 indicator matrix. Priors
    and the likelihood of c of k neighbours carrying a class are counted on the training set
    (each example's neighbours leave itself out), with Laplace smoothing ``s``."""
    train_y = np.asarray(train_y)
    _check_ml_knn(k, len(train_y), s)
    k = min(k, len(train_y) - 1)
    own = np.array(train_sims, dtype=np.float64)
    np.fill_diagonal(own, -np.inf)
    return _ml_knn(_ranked(own, k), _ranked(np.atleast_2d(sims), k), train_y, s)


def _check_ml_knn(k: int, n_train: int, s: float) -> None:
    if k < 1 or n_train < 2 or s <= 0:
        raise InputError(
            f"ML-kNN needs k ≥ 1, at least 2 training examples and s > 0; got k={k}, "
            f"{n_train} examples, s={s}."
        )
