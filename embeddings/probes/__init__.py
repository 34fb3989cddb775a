"""Probes: offline protocols on cached features, without running the encoder again.

Apart from the serving path; each room one step of a probe:

* :mod:`.featureset` — :func:`features` reads a store in one pass into a :class:`Features`
  value (a matrix and one row description per vector); :func:`read_labels` (CSV or
  Parquet), :func:`pool_slices` (slice features per volume: mean, max, mean+max)
* :mod:`.splits` — :func:`patient_split` (no patient spans two splits; a warning from
  :func:`unknown_patients` where some are not known), :func:`column_split`, :func:`hash_split`
* :mod:`.scoring` — :func:`scores`, :func:`scores_multilabel`: scikit-learn metrics with
  bootstrap 95 % intervals
* :mod:`.neighbours` — cosine nearest neighbours: the DINOv2 evaluation's softmax vote
  (:func:`softmax_knn`) and ML-kNN (:func:`ml_knn`)
* :mod:`.targets` — a label's targets, test predictions, rows in entry order, choices on
  validation rows, the study's few-shot draws
* :mod:`.sgd` — the study's linear probe: SGD heads over feature sets and learning rates
  (:class:`SGDHead`)
* :mod:`.logreg_reference` — MM-DINOv2's logistic regression (``method="scholz2025"``):
  C over 45 values chosen by MCC on a tenth of the training rows
* :mod:`.protocols` — :func:`knn`, :func:`fewshot`, :func:`linear`: radcache's methods and
  the DINOv2-on-radiology study's (``method="baharoon2023"``); settings chosen on
  validation rows only; multi-label with ``multilabel=True``
* :mod:`.export` — :func:`save_json`, :func:`export_features` (npz or Parquet, atomically)
* :mod:`.report` — :func:`write_report`: ``result.json``, ``report.md`` and PNG plots
  (matplotlib imported only when called); :class:`Overlay`
* :mod:`.seg_volumes` — segmentation data on patch tokens: :func:`seg_data`,
  :func:`read_masks`, :class:`SegData`, :class:`SegVolume`; the trained head :class:`SegHead`
* :mod:`.seg_reference` — the study's segmentation probe (``method="baharoon2023"``):
  :func:`dice_loss`, :func:`pooled_dice`, SGD over the learning rates of :data:`SEG_LRS`
* :mod:`.segment` — :func:`seg` (radcache's procedure or ``method="baharoon2023"``),
  :func:`split_slices`, :func:`dice`, :func:`overlays`
* :mod:`.datasets` — PyTorch datasets: :class:`PatchDataset`, :class:`SliceDataset`

The modules import one way, in the order listed (each from those above it). The names of
the ``seg*`` modules and :mod:`.datasets` load on first use (PEP 562), so importing this
package does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names
from .export import export_features, save_json
from .featureset import KINDS, Features, Kind, Level, features, pool_slices, read_labels
from .neighbours import SMOOTHING, ml_knn, softmax_knn
from .protocols import C_GRID, KNN_KS, METHODS, REFERENCE_KINDS, SHOTS, Method, fewshot, knn, linear
from .report import Overlay, ci_cell, md_table, pm_cell, write_report
from .scoring import Metric, scores, scores_multilabel
from .sgd import LR_GRID, SGDHead
from .splits import column_split, hash_split, patient_split, unknown_patients

if TYPE_CHECKING:
    from .datasets import PatchDataset, SliceDataset
    from .seg_reference import SEG_LRS, dice_loss, pooled_dice
    from .seg_volumes import SegData, SegHead, SegVolume, read_masks, seg_data
    from .segment import dice, overlays, seg, split_slices

_LAZY = {
    "PatchDataset": "datasets",
    "SliceDataset": "datasets",
    "SEG_LRS": "seg_reference",
    "SegData": "seg_volumes",
    "SegHead": "seg_volumes",
    "SegVolume": "seg_volumes",
    "dice": "segment",
    "dice_loss": "seg_reference",
    "overlays": "segment",
    "pooled_dice": "seg_reference",
    "read_masks": "seg_volumes",
    "seg": "segment",
    "seg_data": "seg_volumes",
    "split_slices": "segment",
}

__all__ = [
    "C_GRID",
    "KINDS",
    "KNN_KS",
    "LR_GRID",
    "METHODS",
    "REFERENCE_KINDS",
    "SEG_LRS",
    "SHOTS",
    "SMOOTHING",
    "Features",
    "Kind",
    "Level",
    "Method",
    "Metric",
    "Overlay",
    "PatchDataset",
    "SGDHead",
    "SegData",
    "SegHead",
    "SegVolume",
    "SliceDataset",
    "ci_cell",
    "column_split",
    "dice",
    "dice_loss",
    "export_features",
    "features",
    "fewshot",
    "hash_split",
    "knn",
    "linear",
    "md_table",
    "ml_knn",
    "overlays",
    "patient_split",
    "pm_cell",
    "pool_slices",
    "pooled_dice",
    "read_labels",
    "read_masks",
    "save_json",
    "scores",
    "scores_multilabel",
    "seg",
    "seg_data",
    "softmax_knn",
    "split_slices",
    "unknown_patients",
    "write_report",
]

__getattr__, __dir__ = lazy_names(__name__, _LAZY, __all__)
