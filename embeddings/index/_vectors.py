"""Shared basics of the index rooms: the level names and unit-norm vectors."""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["LEVELS", "Level", "normalise"]

Level = Literal["series", "slice"]
LEVELS: tuple[Level, ...] = ("series", "slice")


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32, C-contiguous; zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1]).copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x
