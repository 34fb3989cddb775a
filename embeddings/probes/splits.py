"""Splits: ``train``/``val``/``test`` per row, by patient, by a label column, or by a hash of
any key; the same on every run."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from .featureset import Features

__all__ = ["column_split", "hash_split", "patient_split"]


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
