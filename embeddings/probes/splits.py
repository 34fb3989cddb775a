"""Splits: ``train``/``val``/``test`` per row, by patient, by a label column, or by a hash of
any key; the same on every run.

A split by patient is only as good as the patients known: an entry without a patient
pseudonym (a NIfTI, NRRD or MetaImage file sent without a patient reference, or DICOM
without a PatientID) is split by its study instead, so one patient's scans may fall on both
sides. :func:`unknown_patients` says so; :func:`patient_split` logs it as a warning, and the
probe commands put it in the report.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from .featureset import Features

__all__ = ["column_split", "hash_split", "patient_split", "unknown_patients"]

log = logging.getLogger(__name__)


def unknown_patients(known: Sequence[bool], unit: str = "rows") -> str | None:
    """The warning for a split by patient where some ``known`` are False (those rows have
    no patient pseudonym and are split by study), or None when every patient is known."""
    missing = sum(not k for k in known)
    if not missing:
        return None
    return (
        f"{missing} of {len(known)} {unit} have no known patient and are split by study, so "
        "one patient's scans may fall in both train and test; send NIfTI, NRRD and MetaImage "
        "files with a patient reference (the patient form field, radcache embed --patient) "
        "to split them by patient."
    )


def patient_split(
    f: Features, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0
) -> np.ndarray:
    """``train``/``val``/``test`` per row, decided by a hash of the patient pseudonym (so no
    patient spans two splits, and the split is the same on every run). Rows without a known
    patient (``patient_known`` False) are split by their study, with a logged warning."""
    warning = unknown_patients([r.get("patient_known", True) for r in f.rows])
    if warning is not None:
        log.warning("patient split: %s", warning)
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
