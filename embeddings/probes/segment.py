"""Segmentation probes on cached patch tokens.

:func:`seg` trains a linear (1×1) head on the frozen patch tokens of a :class:`SegData`
(read by :func:`~.seg_volumes.seg_data`), its logits upsampled bilinearly to the model's
input canvas, with a soft Dice loss, and scores it once on the held-out ``test`` slices of
a :func:`split_slices` split. Two procedures (``method``):

* ``radcache`` (default): standardised tokens, Adam, a soft Dice pooled over the batch, one
  learning rate; per-class Dice (:func:`dice`) per test slice (2D) and per test volume
  (3D), in each slice's own pixel grid: predictions go back through the recipe's resize and
  padding (:class:`~radcache.embeddings.preprocess.Placement`).
* ``baharoon2023``: the procedure of Baharoon et al. 2023, in :mod:`.seg_reference`.

:func:`overlays` draws test slices for the report. The PyTorch datasets for users who
train their own heads are in :mod:`.datasets`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from ..errors import InputError, InsufficientDataError
from .report import Overlay
from .seg_reference import SEG_LRS, _seg_baharoon2023
from .seg_volumes import SegData, SegHead, _group, _resampled, _upsample
from .splits import hash_split, unknown_patients

__all__ = ["SegMethod", "dice", "overlays", "seg", "split_slices"]

log = logging.getLogger(__name__)

SegMethod = Literal["radcache", "baharoon2023"]


def split_slices(
    data: SegData,
    how: Literal["patient", "blocks"] = "patient",
    *,
    test_fraction: float = 0.3,
    val_fraction: float = 0.0,
    blocks: int = 8,
    seed: int = 0,
) -> np.ndarray:
    """``train``/``val``/``test`` per row of ``data.rows()``. ``patient``: whole patients, by
    a hash of the pseudonym (as the classification probes split), ``test_fraction`` and
    ``val_fraction`` of them to test and val; ``blocks``: each volume cut into ``blocks`` runs
    of adjacent slices, alternately train and test, or with ``val_fraction`` > 0 in turn
    train, val, train, test (for a single volume)."""
    if not (test_fraction > 0 and val_fraction >= 0 and test_fraction + val_fraction < 1):
        raise InputError(
            f"split fractions test {test_fraction}, val {val_fraction}: expected test > 0, "
            "val >= 0 and test + val < 1 (the rest trains)."
        )
    if how == "patient":
        warning = unknown_patients([v.patient_known for v in data.volumes], "volumes")
        if warning is not None:
            log.warning("patient split: %s", warning)
        patients = [data.volumes[v].patient for v, _ in data.rows()]
        train = 1 - test_fraction - val_fraction
        return hash_split(patients, (train, val_fraction, test_fraction), seed)
    cycle = ("train", "val", "train", "test") if val_fraction > 0 else ("train", "test")
    out = []
    for v, i in data.rows():
        n = len(data.volumes[v].slices)
        out.append(cycle[(i * blocks // n) % len(cycle)])
    return np.asarray(out)


def dice(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> np.ndarray:
    """Dice of each class (NaN where a class is in neither ``pred`` nor ``ref``)."""
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        p, r = pred == c, ref == c
        total = int(p.sum()) + int(r.sum())
        if total:
            out[c] = 2.0 * int(np.logical_and(p, r).sum()) / total
    return out


def seg(
    data: SegData,
    split: np.ndarray,
    *,
    method: SegMethod = "radcache",
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    lrs: Sequence[float] | None = None,
    val_epochs: int | None = None,
    seed: int = 0,
    bootstrap: int = 1000,
) -> tuple[dict[str, Any], SegHead]:
    """Train the linear segmentation probe on the ``train`` rows, score the ``test`` rows once.

    ``radcache``: ``epochs`` 100, ``batch_size`` 16, Adam at ``lr`` 3e-2 (``val`` rows are not
    used). ``baharoon2023``: ``epochs`` 10, ``batch_size`` 128, each of ``lrs`` (default
    :data:`SEG_LRS`; ``lr`` alone gives a grid of one) trained on train for ``val_epochs``
    (default ``epochs``) and scored on the ``val`` rows; the best retrained on train+val for
    ``epochs`` and scored on test. Without ``val`` rows only a single learning rate is
    accepted (it trains on train).

    Returns the figures (per-class 2D Dice: mean over test slices; 3D Dice: per test
    volume, its test slices stacked; both with bootstrap 95 % intervals; the loss per
    epoch; for ``baharoon2023`` also the reference's pooled Dice and the validation scores)
    and the trained head."""
    rows = data.rows()
    part = {s: [rows[i] for i in np.flatnonzero(split == s)] for s in ("train", "val", "test")}
    tr, te = part["train"], part["test"]
    if not tr or not te:
        held = "; ".join(
            f"{name}: {len(part[name])} slices of "
            f"{len({data.volumes[v].patient for v, _ in part[name]})} patients"
            for name in ("train", "val", "test")
        )
        raise InsufficientDataError(
            f"segmentation: the split left no {'train' if not tr else 'test'} slices ({held}); "
            "training and scoring need both. A split by patient sends whole patients to test "
            "(30 %) and val, so with few patients split by blocks of adjacent slices instead "
            "(split_slices(..., 'blocks'); CLI --split blocks), try another seed, or add "
            "patients."
        )
    if method == "radcache":
        if lrs is not None or val_epochs is not None:
            raise InputError(
                "lrs and val_epochs belong to method='baharoon2023'; the radcache probe "
                "trains at one lr (pass lr=)."
            )
        result, head = _seg_radcache(
            data,
            tr,
            epochs=100 if epochs is None else epochs,
            batch_size=16 if batch_size is None else batch_size,
            lr=3e-2 if lr is None else lr,
            seed=seed,
        )
    elif method == "baharoon2023":
        if lr is not None and lrs is not None:
            raise InputError("give lr (a grid of one) or lrs, not both.")
        grid = tuple(lrs) if lrs is not None else (lr,) if lr is not None else SEG_LRS
        result, head = _seg_baharoon2023(
            data,
            tr,
            part["val"],
            te,
            lrs=grid,
            epochs=10 if epochs is None else epochs,
            val_epochs=val_epochs or (10 if epochs is None else epochs),
            batch_size=128 if batch_size is None else batch_size,
            seed=seed,
            bootstrap=bootstrap,
        )
    else:
        raise InputError(f"unknown method {method!r}; expected 'radcache' or 'baharoon2023'.")
    return {**result, **_native_scores(data, head, te, bootstrap, seed)}, head


def _seg_radcache(
    data: SegData,
    tr: list[tuple[int, int]],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> tuple[dict[str, Any], SegHead]:
    """radcache's procedure: standardised tokens, Adam, batch-pooled soft Dice on class
    fractions of the canvas."""
    n_classes = len(data.classes)
    by_vol = _group(tr)
    x = torch.cat([torch.from_numpy(data.volumes[v].tokens[i]).float() for v, i in by_vol])
    target = torch.cat([data.volumes[v].canvas_targets(n_classes, i) for v, i in by_vol])
    valid = torch.cat(
        [data.volumes[v].placement.valid().expand(len(i), 1, -1, -1) for v, i in by_vol]
    ).float()
    d = x.shape[-1]
    mean = x.reshape(-1, d).mean(dim=0)
    std = x.reshape(-1, d).std(dim=0).clamp_min(1e-6)
    size = data.volumes[0].placement.size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lin = torch.nn.Linear(d, n_classes)
        opt = torch.optim.Adam(lin.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        head = SegHead(mean, std, lin.weight, lin.bias)
        losses = []
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            total = 0.0
            for start in range(0, len(x), batch_size):
                b = order[start : start + batch_size]
                loss = _soft_dice_loss(_upsample(head.logits(x[b]), size), target[b], valid[b])
                opt.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                total += float(loss.detach()) * len(b)
            losses.append(total / len(x))
    head = SegHead(mean, std, lin.weight.detach().clone(), lin.bias.detach().clone())
    result = {
        "protocol": "seg",
        "method": "radcache",
        "classes": data.classes,
        "space": data.space,
        "n_train_slices": len(tr),
        "n_train_volumes": len({v for v, _ in tr}),
        "epochs": epochs,
        "lr": lr,
        "seed": seed,
        "loss_curve": losses,
    }
    return result, head


def _native_scores(
    data: SegData, head: SegHead, te: list[tuple[int, int]], bootstrap: int, seed: int
) -> dict[str, Any]:
    """radcache's figures: per-class Dice per test slice and per test volume, in each
    slice's own pixel grid, with bootstrap 95 % intervals."""
    n_classes = len(data.classes)
    per_slice, per_volume = [], []
    for v, idx in _group(te):
        vol = data.volumes[v]
        pred, ref = head.predict(vol, idx), vol.masks[idx]
        per_slice += [dice(p, r, n_classes) for p, r in zip(pred, ref, strict=True)]
        per_volume.append(dice(pred, ref, n_classes))
    s2, s3 = np.asarray(per_slice), np.asarray(per_volume)
    fg = range(1, n_classes)
    return {
        "n_test_slices": len(te),
        "n_test_volumes": len(s3),
        "dice_2d": {data.classes[c]: _interval(s2[:, c], bootstrap, seed) for c in fg},
        "dice_3d": {data.classes[c]: _interval(s3[:, c], bootstrap, seed) for c in fg},
    }


def _soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """1 − mean over classes of the batch's soft Dice, padding left out."""
    p = logits.softmax(dim=1) * valid
    t = target * valid
    inter = (p * t).sum(dim=(0, 2, 3))
    denom = p.sum(dim=(0, 2, 3)) + t.sum(dim=(0, 2, 3))
    present = t.sum(dim=(0, 2, 3)) > 0
    d = (2 * inter + 1.0) / (denom + 1.0)
    return 1 - d[present].mean()


def _interval(values: np.ndarray, bootstrap: int, seed: int) -> dict[str, float]:
    """Mean of per-unit values with a bootstrap 95 % interval over the units."""
    v = values[np.isfinite(values)]
    return _resampled(len(v), lambda i: float(v[i].mean()), bootstrap, seed)


def overlays(data: SegData, head: SegHead, split: np.ndarray, n: int = 3) -> list[Any]:
    """Pictures of ``n`` test slices (prediction beside reference), spread over the test
    slices that show the most foreground."""
    rows = data.rows()
    test = [rows[i] for i in np.flatnonzero(split == "test")]
    fg = [(v, i) for v, i in test if (data.volumes[v].masks[i] > 0).mean() > 0.15] or test
    picks = [fg[round(q * (len(fg) - 1))] for q in np.linspace(0.2, 0.8, n)] if n and fg else []
    out = []
    for v, i in picks:
        vol = data.volumes[v]
        pred = head.predict(vol, np.asarray([i]))[0]
        image = None if vol.image is None else vol.image[i]
        title = f"{vol.entry[:8]} slice {int(vol.slices[i])}"
        out.append(Overlay(title, image, pred, vol.masks[i]))
    return out
