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

3D classification averages slice features per volume first (:func:`pool_slices`, also
``max`` and ``mean+max``). Metrics (:func:`scores`) come from scikit-learn, one
implementation each, with bootstrap 95 % intervals. Seeds are fixed, so results are the
same on every CPU run.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    "features",
    "fewshot",
    "knn",
    "linear",
    "patient_split",
    "pool_slices",
    "read_labels",
    "save_json",
    "scores",
]

Level = Literal["series", "slice"]
Kind = Literal["pooled", "cls", "cls_last4", "cls+meanpatch"]
KINDS: tuple[Kind, ...] = ("pooled", "cls", "cls_last4", "cls+meanpatch")
KNN_KS = (5, 20, 50, 100, 200)
SHOTS = (1, 2, 4, 8, 16)
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


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
    """Labels from a CSV keyed by its first column (an entry key, ``series``, ``series#part``
    or ``study``; with a ``slice`` column, ``series@slice``): every other column is a label."""
    with Path(path).open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            raise InputError(f"{path}: no header row; expected a key column and label columns.")
        key = reader.fieldnames[0]
        out: dict[str, dict[str, Any]] = {}
        for row in reader:
            name = row.pop(key)
            if "slice" in row and row["slice"] not in (None, ""):
                name = f"{name}@{int(row.pop('slice'))}"
            out[name] = {k: v for k, v in row.items() if v not in (None, "") and k != "slice"}
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
    cuts = np.cumsum(fractions) / sum(fractions)
    out = []
    for r in f.rows:
        h = hashlib.sha256(f"{seed}:{r['patient']}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        out.append("train" if u < cuts[0] else "val" if u < cuts[1] else "test")
    return np.asarray(out)


# -- metrics ---------------------------------------------------------------------------------
def _metric_fns() -> dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], float]]:
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


def scores(
    y: np.ndarray, proba: np.ndarray, *, bootstrap: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Each metric with a bootstrap 95 % interval: ``{name: {value, low, high}}``.

    ``y`` holds class indices, ``proba`` per-class probabilities (rows sum to 1)."""
    import warnings

    fns = _metric_fns()
    pred = proba.argmax(axis=1)
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


def _encode(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    col = {c: i for i, c in enumerate(classes)}
    return np.asarray([col[v] for v in labels])


# -- protocols -------------------------------------------------------------------------------
def knn(
    train: Features,
    test: Features,
    label: str,
    *,
    ks: Iterable[int] = KNN_KS,
    temperature: float = TEMPERATURE,
    bootstrap: int = 1000,
) -> dict[str, Any]:
    """Weighted kNN on cosine similarity, for each k; figures per k."""
    tr, te = train.labelled(label), test.labelled(label)
    classes = sorted(set(tr.labels(label)) | set(te.labels(label)))
    ytr, yte = tr.labels(label), te.labels(label)
    sims = normalise(te.x) @ normalise(tr.x).T
    per_k = {}
    for k in ks:
        proba = knn_vote(sims, list(ytr), classes, k=k, temperature=temperature)
        per_k[str(k)] = scores(_encode(yte, classes), proba, bootstrap=bootstrap)
    best = max(per_k, key=lambda k: per_k[k]["balanced_accuracy"]["value"])
    return {
        "protocol": "knn",
        "label": label,
        "classes": classes,
        "temperature": temperature,
        "n_train": len(tr),
        "n_test": len(te),
        "by_k": per_k,
        "best_k": int(best),
    }


def _logreg(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed)
    )
    return model.fit(x, y)


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
) -> dict[str, Any]:
    """Logistic regression: C chosen on ``val`` (balanced accuracy), refit on train + val,
    scored once on ``test``."""
    from sklearn.metrics import balanced_accuracy_score

    tr, va, te = train.labelled(label), val.labelled(label), test.labelled(label)
    classes = sorted(set(tr.labels(label)) | set(va.labels(label)) | set(te.labels(label)))
    ytr, yva, yte = (_encode(f.labels(label), classes) for f in (tr, va, te))
    grid = {}
    for c in cs:
        model = _logreg(tr.x, ytr, c, seed)
        grid[str(c)] = float(balanced_accuracy_score(yva, model.predict(va.x))) if len(va) else 0.0
    best = max(grid, key=lambda c: (grid[c], -float(c)))  # ties: the stronger regulariser
    model = _logreg(np.concatenate([tr.x, va.x]), np.concatenate([ytr, yva]), float(best), seed)
    proba = _proba(model, te.x, len(classes))
    return {
        "protocol": "linear",
        "label": label,
        "classes": classes,
        "n_train": len(tr),
        "n_val": len(va),
        "n_test": len(te),
        "val_balanced_accuracy_by_c": grid,
        "c": float(best),
        "test": scores(yte, proba, bootstrap=bootstrap),
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
) -> dict[str, Any]:
    """n labelled examples per class (``draws`` random draws each), kNN and logistic
    regression heads; mean and std of every metric over the draws."""
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
