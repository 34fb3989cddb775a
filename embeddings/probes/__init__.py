"""Probes: offline protocols on cached features, without running the encoder again.

Apart from the serving path; each room one step of a probe:

* :mod:`.featureset` — :func:`features` reads a store in one pass into a :class:`Features`
  value (a matrix and one row description per vector); :func:`read_labels` (CSV or
  Parquet), :func:`pool_slices` (slice features per volume: mean, max, mean+max)
* :mod:`.splits` — :func:`patient_split` (no patient spans two splits; a warning from
  :func:`unknown_patients` where some are not known), :func:`column_split`, :func:`hash_split`
* :mod:`.scoring` — :func:`scores`, :func:`scores_multilabel`: scikit-learn metrics with
  bootstrap 95 % intervals
* :mod:`.neighbours` — cosine nearest neighbours and ML-kNN (:func:`ml_knn`)
* :mod:`.protocols` — :func:`knn`, :func:`fewshot`, :func:`linear` (the DINOv2-on-radiology
  study's protocols, multi-label with ``multilabel=True``)
* :mod:`.export` — :func:`save_json`, :func:`export_features` (npz or Parquet, atomically)
* :mod:`.report` — :func:`write_report`: ``result.json``, ``report.md`` and PNG plots
  (matplotlib imported only when called); :class:`Overlay`
* :mod:`.segment` — segmentation probes on patch tokens: :func:`seg_data`, :func:`seg`,
  :func:`dice`, :func:`split_slices`, :func:`overlays`, :func:`read_masks`
* :mod:`.datasets` — PyTorch datasets: :class:`PatchDataset`, :class:`SliceDataset`

The modules import one way, in the order listed (each from those above it). The names of
:mod:`.segment` and :mod:`.datasets` load on first use (PEP 562), so importing this package
does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names
from .export import export_features, save_json
from .featureset import KINDS, Features, Kind, Level, features, pool_slices, read_labels
from .neighbours import SMOOTHING, ml_knn
from .protocols import C_GRID, KNN_KS, SHOTS, fewshot, knn, linear
from .report import Overlay, write_report
from .scoring import Metric, scores, scores_multilabel
from .splits import column_split, hash_split, patient_split, unknown_patients

if TYPE_CHECKING:
    from .datasets import PatchDataset, SliceDataset
    from .segment import (
        SegData,
        SegHead,
        SegVolume,
        dice,
        overlays,
        read_masks,
        seg,
        seg_data,
        split_slices,
    )

_LAZY = {
    "PatchDataset": "datasets",
    "SliceDataset": "datasets",
    "SegData": "segment",
    "SegHead": "segment",
    "SegVolume": "segment",
    "dice": "segment",
    "overlays": "segment",
    "read_masks": "segment",
    "seg": "segment",
    "seg_data": "segment",
    "split_slices": "segment",
}

__all__ = [
    "C_GRID",
    "KINDS",
    "KNN_KS",
    "SHOTS",
    "SMOOTHING",
    "Features",
    "Kind",
    "Level",
    "Metric",
    "Overlay",
    "PatchDataset",
    "SegData",
    "SegHead",
    "SegVolume",
    "SliceDataset",
    "column_split",
    "dice",
    "export_features",
    "features",
    "fewshot",
    "hash_split",
    "knn",
    "linear",
    "ml_knn",
    "overlays",
    "patient_split",
    "pool_slices",
    "read_labels",
    "read_masks",
    "save_json",
    "scores",
    "scores_multilabel",
    "seg",
    "seg_data",
    "split_slices",
    "unknown_patients",
    "write_report",
]

__getattr__, __dir__ = lazy_names(__name__, _LAZY, __all__)
