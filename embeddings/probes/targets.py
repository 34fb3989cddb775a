"""Targets and rows for the classification probes: a label's classes as indices or
indicator matrices, the test rows' predictions, rows in entry order, choices made on
validation rows only, and the few-shot draws of Baharoon et al. 2023's code
(MohammedSB/DINOv2ForRadiology)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InsufficientDataError
from .featureset import Features
from .scoring import scores, scores_multilabel

__all__: list[str] = []  # helpers of .protocols and .sgd


def _encode(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    col = {c: i for i, c in enumerate(classes)}
    return np.asarray([col[v] for v in labels], dtype=np.int64)


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


_SPLITS = ("train", "val", "test")
_ADVICE = (
    "The default split sends whole patients to train/val/test (70/10/20, by a hash of the "
    "patient pseudonym), so every split needs patients of its own: label more patients "
    "(a few dozen, with every class among them), try another --seed, or give each row's "
    "split in a label column (--split-column)."
)


def _describe_splits(parts: Sequence[Features], label: str) -> str:
    """Per split: its patients, labelled rows and rows per class (for error messages)."""
    out = []
    for name, f in zip(_SPLITS, parts, strict=True):
        if not len(f):
            out.append(f"{name}: no rows")
            continue
        patients = len({r["patient"] for r in f.rows})
        values, counts = np.unique(f.labels(label).astype(str), return_counts=True)
        classes = ", ".join(f"{v} {n}" for v, n in zip(values, counts, strict=True))
        out.append(
            f"{name}: {patients} patient{'s' * (patients != 1)}, {len(f)} "
            f"row{'s' * (len(f) != 1)} ({classes})"
        )
    return "; ".join(out)


def _labelled_splits(
    probe: str,
    parts: tuple[Features, Features, Features],
    label: str,
    *,
    multilabel: bool = False,
) -> tuple[Features, Features, Features]:
    """The rows of train, val and test labelled ``label``, checked before anything is
    fitted: some row has the label, train and test have rows, and (single-label) train
    has two classes or more. :class:`~radcache.embeddings.errors.InsufficientDataError`
    otherwise, saying what each split holds and what to change. Validation rows are
    checked where a setting is chosen on them (:func:`_need_val`)."""
    tr, va, te = (f.labelled(label) for f in parts)
    if not (len(tr) or len(va) or len(te)):
        names = sorted({k for f in parts for r in f.rows for k in r["labels"]})
        raise InsufficientDataError(
            f"{probe}: no row has a value for label {label!r}; "
            + (
                f"the labels given are {', '.join(map(repr, names))}."
                if names
                else "no entry has labels: give a labels file (--labels) whose first column "
                "names entry keys, series or studies, or label entries when they are embedded."
            )
        )
    problem = None
    if not len(tr) or not len(te):
        empty = " and ".join(n for n, f in (("train", tr), ("test", te)) if not len(f))
        problem = f"the {empty} split has no rows labelled {label!r}"
    elif not multilabel and len(set(tr.labels(label))) < 2:
        problem = (
            f"the train split's rows labelled {label!r} are all of one class, and a "
            "classifier needs two or more"
        )
    if problem is not None:
        raise InsufficientDataError(
            f"{probe}: {problem} ({_describe_splits((tr, va, te), label)}). {_ADVICE}"
        )
    return tr, va, te


def _need_val(val: Features, label: str, what: str, n_choices: int, single: str) -> None:
    """A choice among ``n_choices`` settings is made on ``val``: it must have rows."""
    if n_choices > 1 and not len(val):
        raise InsufficientDataError(
            f"the validation split has no rows labelled {label!r}, and {what} is chosen on it "
            "(never on test): give validation rows (the default split by patient holds out "
            f"10 %; with --split-column, mark some rows 'val') or {single}."
        )


def _need_shots(per_class: dict[str, int], smallest: int, label: str) -> int:
    """The fewest rows a class has (``per_class``: rows per class of the few-shot pool),
    which must be ``smallest`` shots at least; larger shots are left out of the result."""
    fewest = min(per_class.values())
    if fewest < smallest:
        held = ", ".join(f"{cl} {n}" for cl, n in per_class.items())
        raise InsufficientDataError(
            f"few-shot: {smallest} examples per class are drawn from train + val, which "
            f"hold {held} rows labelled {label!r}; give --shots of at most {fewest}, or "
            "label more patients."
        )
    return fewest


def _first_best(values: dict[str, float]) -> str:
    """The key of the largest value, the first on ties; NaN counts as the smallest."""
    return max(values, key=lambda k: np.nan_to_num(values[k], nan=-np.inf))


def _score(
    y: np.ndarray,
    p: np.ndarray,
    classes: Sequence[str],
    multilabel: bool,
    bootstrap: int,
    raw: bool,
) -> Any:
    if multilabel:
        return scores_multilabel(y, p, classes, bootstrap=bootstrap)
    return scores(y, p, bootstrap=bootstrap, raw=raw)


def _cells(s: dict[str, Any]) -> dict[str, float]:
    """The values of a scores dict (per-class tables left out)."""
    return {m: v["value"] for m, v in s.items() if isinstance(v, dict) and "value" in v}


def _in_order(f: Features) -> Features:
    """Rows by entry key and slice: a draw from them does not depend on ingest order."""
    keys = [(r["entry"], -1 if r["slice"] is None else r["slice"]) for r in f.rows]
    return f.take(sorted(range(len(f)), key=keys.__getitem__))


def _per_class_draw(y: np.ndarray, n_classes: int, n: int, seed: int) -> np.ndarray:
    """knn.py's ``filter_train``: with the torch seed ``seed``, each class in turn (class
    index order) gives the first ``n`` of a random permutation of its rows."""
    import torch

    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(n_classes):
        rows = np.flatnonzero(y == c)
        if len(rows):
            picks.append(rows[torch.randperm(len(rows), generator=g)[:n].numpy()])
    return np.concatenate(picks)


def _evenly_spaced(n_rows: int, shots: int) -> np.ndarray:
    """linear.py's ``FewShotDatasetWrapper``: ``shots`` rows in total, evenly spaced."""
    if not n_rows:
        return np.zeros(0, np.int64)
    return np.arange(0, n_rows, n_rows / shots).round().astype(np.int64)


def _patients_per_class(f: Features, label: str, shots: int, classes: Sequence[str]) -> np.ndarray:
    """``get_fewshot_in_nih`` of dinov2/data/utils.py: for each class, the first ``shots``
    patients (by patient) whose every row carries it, every row of each; a patient taken
    for an earlier class is skipped but still counts towards the ``shots``."""
    sets = [s or frozenset() for s in f.label_sets(label)]
    rows: dict[str, list[int]] = {}
    for i, r in enumerate(f.rows):
        rows.setdefault(str(r["patient"]), []).append(i)
    common = {p: frozenset.intersection(*(sets[i] for i in rows[p])) for p in sorted(rows)}
    taken: set[str] = set()
    out: list[int] = []
    for c in classes:
        for p in [p for p, s in common.items() if c in s][:shots]:
            if p not in taken:
                taken.add(p)
                out.extend(rows[p])
    return np.asarray(out, dtype=np.int64)
