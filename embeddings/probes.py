"""Probes: offline protocols on cached features, without running the encoder again.

Entry point :func:`features` reads a store in one pass into a :class:`Features` value (a
matrix and one row description per vector); :func:`patient_split` splits it so that no
patient spans two splits; the protocols of the DINOv2-on-radiology study (Baharoon et al.
2023) run on it:

* :func:`knn` — L2-normalised features, cosine similarity, softmax-weighted vote with
  temperature 0.07 (the same :func:`radcache.embeddings.search.knn_vote` the service uses),
  k swept over {5, 20, 50, 100, 200};
* :func:`fewshot` — n labelled examples per class, several random draws, kNN and
  logistic-regression heads, mean ± std;
* :func:`linear` — logistic regression on standardised features, C chosen on the
  validation split from a grid, retrained on train + val, scored once on test.

Multi-label tasks (a label value is a ``|``-separated set of class names, as in
ChestX-ray14's ``Finding Labels``; :meth:`Features.label_sets`) take ``multilabel=True``:
:func:`knn` runs ML-kNN (:func:`ml_knn`), :func:`linear` one logistic regression per class
(binary cross-entropy), both scored by macro AUROC (:func:`scores_multilabel`).

3D classification averages slice features per volume first (:func:`pool_slices`, also
``max`` and ``mean+max``). Metrics (:func:`scores`, :func:`scores_multilabel`) come from
scikit-learn, one implementation each, with bootstrap 95 % intervals. Seeds are fixed, so
results are the same on every CPU run. Labels come from CSV or Parquet
(:func:`read_labels`); :func:`export_features` writes features as npz or Parquet.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import InputError, NotFoundError
from .index import normalise
from .search import TEMPERATURE, knn_vote
from .store import EmbeddingStore

__all__ = [
    "KINDS",
    "Features",
    "column_split",
    "export_features",
    "features",
    "fewshot",
    "hash_split",
    "knn",
    "linear",
    "ml_knn",
    "patient_split",
    "pool_slices",
    "read_labels",
    "save_json",
    "scores",
    "scores_multilabel",
]

Level = Literal["series", "slice"]
Kind = Literal["pooled", "cls", "cls_last4", "cls+meanpatch"]
KINDS: tuple[Kind, ...] = ("pooled", "cls", "cls_last4", "cls+meanpatch")
KNN_KS = (5, 20, 50, 100, 200)
SHOTS = (1, 2, 4, 8, 16)
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
SMOOTHING = 1.0  # ML-kNN's Laplace smoothing s (Zhang & Zhou 2007)


@dataclass
class Features:
    """Feature vectors ``x`` (n, D) and, per row, where it came from and its labels."""

    x: np.ndarray
    rows: list[dict[str, Any]]
    level: Level
    kind: Kind
    space: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, idx: np.ndarray | Sequence[int]) -> Features:
        idx = np.asarray(idx, dtype=np.int64)
        return replace(self, x=self.x[idx], rows=[self.rows[i] for i in idx])

    def labels(self, name: str) -> np.ndarray:
        """The label ``name`` of each row as strings (None where a row has none)."""
        out = [r["labels"].get(name) for r in self.rows]
        return np.asarray([None if v is None else str(v) for v in out], dtype=object)

    def label_sets(self, name: str) -> list[frozenset[str] | None]:
        """The label ``name`` of each row as a set of class names: the value split on ``|``
        (ChestX-ray14's ``Effusion|Nodule``); ``""`` is the empty set (no positive class),
        None where a row has no value. ``No Finding`` is a class like any other: drop those
        rows or values beforehand to leave it out."""
        return [
            None if v is None else frozenset(c.strip() for c in v.split("|") if c.strip())
            for v in self.labels(name)
        ]

    @staticmethod
    def concat(parts: Sequence[Features]) -> Features:
        first = parts[0]
        x = np.concatenate([p.x for p in parts])
        return replace(first, x=x, rows=[r for p in parts for r in p.rows])

    def labelled(self, name: str) -> Features:
        return self.take([i for i, v in enumerate(self.labels(name)) if v is not None])


def _space(store: EmbeddingStore, space: str | None) -> str:
    spaces = store.spaces()
    if space is not None:
        if space not in spaces:
            raise NotFoundError(f"no space {space!r} in {store.url}; it has {', '.join(spaces)}.")
        return space
    if len(spaces) != 1:
        raise InputError(
            f"{store.url} holds {len(spaces)} spaces ({', '.join(spaces) or 'none'}); name one "
            "with space= (features of different models or recipes are not comparable)."
        )
    return spaces[0]


def read_labels(path: str | Path) -> dict[str, dict[str, Any]]:
    """Labels from a CSV or Parquet file (by suffix ``.parquet``) keyed by its first column
    (an entry key, ``series``, ``series#part`` or ``study``; with a ``slice`` column,
    ``series@slice``): every other column is a label, values as strings, null or empty
    values left out."""
    if Path(path).suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except pa.ArrowException as exc:
            raise InputError(f"{path}: not a readable Parquet file ({exc}).") from exc
        return _label_rows(path, table.column_names, table.to_pylist())
    with Path(path).open(newline="") as fh:
        reader = csv.DictReader(fh)
        return _label_rows(path, reader.fieldnames or [], reader)


def _label_rows(
    path: str | Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    if not columns:
        raise InputError(f"{path}: no header row; expected a key column and label columns.")
    key = columns[0]
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        name = row.pop(key)
        if name in (None, ""):
            continue
        sl = row.pop("slice", None)
        if sl not in (None, ""):
            try:
                name = f"{name}@{int(sl)}"
            except ValueError:
                raise InputError(f"{path}: slice {sl!r} of {name} is not an integer.") from None
        out[name] = {k: str(v) for k, v in row.items() if v not in (None, "")}
    return out


def features(
    store: EmbeddingStore,
    *,
    level: Level = "series",
    kind: Kind = "pooled",
    space: str | None = None,
    labels: Mapping[str, Mapping[str, Any]] | None = None,
) -> Features:
    """Every entry of one space as features, read in one pass over the store.

    ``kind``: ``pooled`` (series: the stored mean of slice CLS; slice: the CLS), ``cls``
    (the same vectors), ``cls_last4`` (CLS of the last 4 blocks, concatenated), or
    ``cls+meanpatch`` (CLS and mean patch token, concatenated). Series level averages
    per-slice kinds over the volume. ``labels`` (from :func:`read_labels`) override labels
    stored at submission.
    """
    if kind not in KINDS:
        raise InputError(f"unknown feature kind {kind!r}; expected one of {', '.join(KINDS)}.")
    name = _space(store, space)
    table = store.table(name)
    attrs = store.entry_attrs(table.keys)
    xs: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    for i, key in enumerate(table.keys):
        a = attrs.get(key)
        if a is None:
            continue
        vol = a.get("volume", {})
        base = {
            "entry": key,
            "study": vol.get("study"),
            "series": vol.get("series"),
            "part": vol.get("part", ""),
            "patient": vol.get("patient") or vol.get("study"),
            "modality": vol.get("modality"),
        }
        stored = dict(a.get("labels", {}))
        if kind in ("pooled", "cls"):
            per_slice = table.slice_cls(i)
        elif kind == "cls_last4":
            last = store.read(key, "cls_last")
            per_slice = last.reshape(len(last), -1)
        else:
            per_slice = np.concatenate([table.slice_cls(i), store.read(key, "mean_patch")], axis=1)
        if level == "series":
            vec = table.pooled[i] if kind in ("pooled", "cls") else per_slice.mean(axis=0)
            xs.append(np.asarray(vec, np.float32)[None])
            rows.append({**base, "slice": None, "labels": _labels_for(base, None, stored, labels)})
        else:
            sl = store.read(key, "slice_index") if a.get("volume_slices") != a["n_slices"] else None
            xs.append(np.asarray(per_slice, np.float32))
            for r in range(len(per_slice)):
                s = int(sl[r]) if sl is not None else r
                lab = _labels_for(base, s, stored, labels)
                rows.append({**base, "slice": s, "labels": lab})
    x = np.concatenate(xs) if xs else np.zeros((0, int(table.attrs["dim"])), np.float32)
    return Features(x, rows, level, kind, name, {"model": table.attrs.get("model")})


def _labels_for(
    base: Mapping[str, Any],
    sl: int | None,
    stored: Mapping[str, Any],
    given: Mapping[str, Mapping[str, Any]] | None,
) -> dict[str, Any]:
    out = dict(stored)
    if given:
        series = base["series"] + (f"#{base['part']}" if base["part"] else "")
        for name in (base["study"], base["series"], series, base["entry"]):
            out.update(given.get(name, {}))
            if sl is not None:
                out.update(given.get(f"{name}@{sl}", {}))
    return out


def pool_slices(f: Features, how: Literal["mean", "max", "mean+max"] = "mean") -> Features:
    """Slice-level features pooled per volume (the 3D classification protocol)."""
    if f.level != "slice":
        raise InputError("pool_slices needs slice-level features.")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(f.rows):
        groups.setdefault(r["entry"], []).append(i)
    xs, rows = [], []
    for idx in groups.values():
        part = f.x[idx]
        pooled = {
            "mean": part.mean(axis=0),
            "max": part.max(axis=0),
            "mean+max": np.concatenate([part.mean(axis=0), part.max(axis=0)]),
        }[how]
        xs.append(pooled)
        r = dict(f.rows[idx[0]])
        rows.append({**r, "slice": None, "labels": dict(r["labels"])})
    return Features(np.stack(xs).astype(np.float32), rows, "series", f.kind, f.space, f.meta)


def patient_split(
    f: Features, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0
) -> np.ndarray:
    """``train``/``val``/``test`` per row, decided by a hash of the patient pseudonym (so no
    patient spans two splits, and the split is the same on every run)."""
    return hash_split([r["patient"] for r in f.rows], fractions, seed)


def column_split(f: Features, column: str) -> np.ndarray:
    """``train``/``val``/``test`` per row from a label column (a dataset's official split);
    rows without it, or with another value, are an error naming one of them."""
    values = f.labels(column)
    for r, v in zip(f.rows, values, strict=True):
        if v not in ("train", "val", "test"):
            where = r["series"] + (f" slice {r['slice']}" if r["slice"] is not None else "")
            raise InputError(
                f"split column {column!r} of {where} is {v!r}; expected train, val or test "
                "on every row."
            )
    return np.asarray(values, dtype=str)


def hash_split(
    keys: Sequence[Any],
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    names: Sequence[str] = ("train", "val", "test"),
) -> np.ndarray:
    """One of ``names`` per key, drawn with ``fractions`` from a hash of the key and seed:
    equal keys land together, and every run splits alike."""
    cuts = np.cumsum(fractions) / sum(fractions)
    out = []
    for key in keys:
        h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        out.append(names[min(int(np.searchsorted(cuts, u, side="right")), len(names) - 1)])
    return np.asarray(out)


# -- metrics ---------------------------------------------------------------------------------
Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]  # (y, proba, prediction)


def _metric_fns() -> dict[str, Metric]:
    from sklearn import metrics as m

    def auroc(y: np.ndarray, p: np.ndarray, pred: np.ndarray) -> float:
        present = np.unique(y)
        if len(present) < 2:
            return float("nan")
        if p.shape[1] == 2:
            return float(m.roc_auc_score(y, p[:, 1]))
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
    y: np.ndarray, proba: np.ndarray, *, bootstrap: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Each metric with a bootstrap 95 % interval: ``{name: {value, low, high}}``.

    ``y`` holds class indices, ``proba`` per-class probabilities (rows sum to 1)."""
    pred = proba.argmax(axis=1)
    return _with_intervals(_metric_fns(), y, proba, pred, bootstrap=bootstrap, seed=seed)


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


def save_json(result: Mapping[str, Any], path: str | Path) -> None:
    """Write a protocol's figures as JSON (NaN written as null)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not np.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    Path(path).write_text(json.dumps(clean(dict(result)), indent=1))


@contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it when the block succeeds (readers
    never see a half-written file)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_features(f: Features, path: str | Path, fmt: Literal["npz", "parquet"] = "npz") -> Path:
    """Write ``f`` for other tools, atomically (a temporary file in the same folder, then a
    rename): per row ``entry, study, series, part, patient, modality``, ``slice``, ``labels``
    (JSON) and the features ``x``.

    npz: missing strings as ``""``, ``slice`` -1 at series level, ``x`` an (n, D) array.
    Parquet: string columns (null where missing), ``slice`` int32 (null at series level),
    ``x`` a ``fixed_size_list<float32>[D]`` column; ``space``, ``level``, ``kind`` and
    ``model`` (JSON) in the schema metadata."""
    if fmt not in ("npz", "parquet"):
        raise InputError(f"unknown export format {fmt!r}; expected npz or parquet.")
    path = Path(path)
    cols = ("entry", "study", "series", "part", "patient", "modality")
    labels = [json.dumps(r["labels"], sort_keys=True) for r in f.rows]
    slices = [r["slice"] for r in f.rows]
    with _replacing(path) as tmp:
        if fmt == "npz":
            arrays: dict[str, Any] = {
                c: np.asarray([str(r[c] or "") for r in f.rows]) for c in cols
            }
            arrays["x"] = f.x
            arrays["slice"] = np.asarray([-1 if s is None else s for s in slices])
            arrays["labels"] = np.asarray(labels)
            with tmp.open("xb") as fh:
                np.savez(fh, **arrays)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            x = np.ascontiguousarray(f.x, dtype=np.float32)
            columns = {
                c: pa.array([None if r[c] is None else str(r[c]) for r in f.rows], pa.string())
                for c in cols
            }
            columns["slice"] = pa.array(slices, pa.int32())
            columns["labels"] = pa.array(labels, pa.string())
            columns["x"] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
            meta = {"space": f.space, "level": f.level, "kind": f.kind}
            meta["model"] = json.dumps(f.meta.get("model"), sort_keys=True)
            pq.write_table(pa.table(columns, metadata=meta), tmp)
    return path
