"""PyTorch datasets on the store, for users who train their own heads: :class:`PatchDataset`
(patch grids with masks resampled to the patch grid) and :class:`SliceDataset` (one feature
vector and label per slice)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .seg_volumes import SegData

__all__ = ["PatchDataset", "SliceDataset"]


class PatchDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Slices of :class:`SegData` for training a dense head: ``tokens`` ``(D, h, w)``,
    ``target`` (class fractions on the patch grid, ``(C, h, w)``), ``entry``, ``slice``."""

    def __init__(self, data: SegData, rows: Sequence[tuple[int, int]] | None = None) -> None:
        self.data = data
        self.items = list(rows) if rows is not None else data.rows()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        v, s = self.items[i]
        vol = self.data.volumes[v]
        idx = np.asarray([s])
        return {
            "tokens": torch.from_numpy(vol.tokens[s]).float().permute(2, 0, 1),
            "target": vol.grid_targets(len(self.data.classes), idx)[0],
            "entry": vol.entry,
            "slice": int(vol.slices[s]),
        }


class SliceDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Slice-level features (:func:`radcache.embeddings.probes.features` with
    ``level="slice"``) with one label: ``x`` ``(D,)``, ``y`` (class number), ``entry``,
    ``slice``. Rows without the label are left out; ``classes`` fixes the numbering."""

    def __init__(self, features: Any, label: str, classes: Sequence[str] | None = None) -> None:
        f = features.labelled(label)
        values = f.labels(label)
        self.classes = list(classes) if classes else sorted(set(values))
        number = {c: k for k, c in enumerate(self.classes)}
        self.x = torch.from_numpy(np.ascontiguousarray(f.x, dtype=np.float32))
        self.y = torch.as_tensor([number[v] for v in values], dtype=torch.long)
        self.rows = f.rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.rows[i]
        return {"x": self.x[i], "y": self.y[i], "entry": r["entry"], "slice": r["slice"]}
