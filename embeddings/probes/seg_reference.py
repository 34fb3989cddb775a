"""The segmentation probe of Baharoon et al. 2023 (``seg(method="baharoon2023")`` in
:mod:`.segment`; :data:`REFERENCE`): raw tokens, N(0, 0.01) init, SGD with momentum and a
cosine schedule, MONAI's Dice loss (:func:`dice_loss`) against nearest-neighbour targets on
the canvas, the learning rates of :data:`SEG_LRS` chosen on the ``val`` slices by
:func:`pooled_dice`, the chosen one retrained on train+val and scored on test. What cached
tokens cannot reproduce is in :data:`BAHAROON2023_CAVEATS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, InsufficientDataError
from .seg_volumes import SegData, SegHead, _group, _linear, _resampled, _upsample

__all__ = ["BAHAROON2023_CAVEATS", "REFERENCE", "SEG_LRS", "dice_loss", "pooled_dice"]


REFERENCE = (
    "MohammedSB/DINOv2ForRadiology: dinov2/eval/segmentation/segmentation.py (procedure), "
    "dinov2/eval/segmentation/utils.py (LinearDecoder), dinov2/data/transforms.py "
    "(make_segmentation_*_transforms), dinov2/eval/metrics.py (build_segmentation_metrics)"
)
SEG_LRS: tuple[float, ...] = (1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 1e-1)
"""The reference's learning-rate grid (segmentation.py, ``--learning-rates`` default)."""

BAHAROON2023_CAVEATS: tuple[str, ...] = (
    "Training-time augmentation is not reproduced. The reference (dinov2/data/transforms.py, "
    "make_segmentation_train_transforms) flips the 448-pixel image and mask vertically (two "
    "RandomVerticalFlip(0.25); the second is named hflip) and turns both by a uniform angle "
    "in [-90, 90] degrees (RandomRotation(90): nearest, zero fill) before the encoder; cached "
    "tokens are those of the unaugmented image. Flipping or turning by 90 degrees the cached "
    "token grid together with its target changes neither the Dice loss nor its gradients for "
    "a 1x1 head with bilinear upsampling, so it is not done.",
    "Tokens are read as stored, in float16; the reference feeds its head the encoder's "
    "float32 normed patch tokens (LayerNorm runs in float32 under fp16 autocast).",
    "A training sample is one slice; for 3D data (BTCV) the reference draws a new run of 10 "
    "adjacent slices of a volume each time the volume is visited.",
    "Data order and initial weights come from torch generators seeded with the seed; the "
    "reference's (its InfiniteSampler and global seed 0) differ, so a run matches the "
    "reference in procedure, not digit for digit.",
)


def dice_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """MONAI's ``DiceLoss(softmax=True, to_onehot_y=True)`` at its defaults, as the reference
    trains (segmentation.py): softmax over the classes of ``(n, C, H, W)`` logits, one-hot
    ``(n, H, W)`` labels, per sample and class ``1 − (2·Σpt + s) / (Σp + Σt + s)`` with
    ``s = 1e-5`` in numerator and denominator, background included, the mean over samples
    and classes. ``valid`` ``(n, 1, H, W)`` leaves pixels out (the padding of a ``pad``
    recipe; a stretched canvas has none)."""
    p = logits.softmax(dim=1)
    t = F.one_hot(labels.long(), p.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    if valid is not None:
        p, t = p * valid, t * valid
    inter = (p * t).sum(dim=(2, 3))
    denom = p.sum(dim=(2, 3)) + t.sum(dim=(2, 3))
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def _counts(
    pred: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor | None, n_classes: int
) -> np.ndarray:
    """Per row of ``(n, …)`` label maps, per class: true positives, false positives, false
    negatives over the ``valid`` pixels, ``(n, C, 3)``."""
    n = pred.shape[0]
    p, r = pred.reshape(n, -1).long(), ref.reshape(n, -1).long()
    code = torch.arange(n).view(-1, 1) * n_classes**2 + r * n_classes + p
    if valid is not None:
        code = code[valid.reshape(n, -1).expand_as(code)]
    conf = torch.bincount(code.reshape(-1), minlength=n * n_classes**2)
    conf = conf.view(n, n_classes, n_classes)  # [row, reference, prediction]
    tp = conf.diagonal(dim1=1, dim2=2)
    fp, fn = conf.sum(dim=1) - tp, conf.sum(dim=2) - tp
    return torch.stack([tp, fp, fn], dim=-1).numpy()


def _macro_dice(counts: np.ndarray) -> tuple[float, np.ndarray]:
    """(macro Dice over classes 1…, per-class Dice) from ``(C, 3)`` pooled counts; the macro
    figure is 0 where no foreground class occurs (torchmetrics' zero division)."""
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    total = 2 * tp + fp + fn
    per = np.where(total > 0, 2 * tp / np.maximum(total, 1), np.nan)
    fg = per[1:][np.isfinite(per[1:])]
    return (float(fg.mean()) if len(fg) else 0.0), per


def pooled_dice(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> tuple[float, np.ndarray]:
    """Dice as the reference scores segmentation (metrics.py: torchmetrics 0.10
    ``Dice(average="macro", ignore_index=0)``, multi-dimensional inputs pooled): per class
    ``2·TP / (2·TP + FP + FN)`` counted over every pixel of ``pred`` and ``ref`` (label maps
    of any equal shape, say a whole split's slices), NaN for a class in neither; the macro
    figure is the mean over the foreground classes (1, 2, …) that have a value (0 if none).
    Returns ``(macro, per-class)``."""
    p, r = torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(ref))
    return _macro_dice(_counts(p.reshape(1, -1), r.reshape(1, -1), None, n_classes)[0])


@dataclass
class _CanvasRows:
    """Slices for the ``baharoon2023`` procedure: tokens as stored, labels on the canvas."""

    tokens: torch.Tensor  # (n, h, w, D) float16
    labels: torch.Tensor  # (n, S, S) canvas labels
    volume: torch.Tensor  # (n,) volume number of each row
    valid: dict[int, torch.Tensor]  # volume number → (S, S) bool, for volumes with padding

    @classmethod
    def of(cls, data: SegData, rows: list[tuple[int, int]]) -> _CanvasRows:
        groups = _group(rows)
        vols = [(v, data.volumes[v]) for v, _ in groups]
        return cls(
            torch.from_numpy(np.concatenate([data.volumes[v].tokens[i] for v, i in groups])),
            torch.cat([data.volumes[v].canvas_labels(i) for v, i in groups]),
            torch.cat([torch.full((len(i),), v) for v, i in groups]),
            {v: m for v, vol in vols if not (m := vol.placement.valid()).all()},
        )

    def __add__(self, other: _CanvasRows) -> _CanvasRows:
        """These rows, then ``other``'s (the reference's ConcatDataset([train, val]))."""
        return _CanvasRows(
            torch.cat([self.tokens, other.tokens]),
            torch.cat([self.labels, other.labels]),
            torch.cat([self.volume, other.volume]),
            {**self.valid, **other.valid},
        )

    def __len__(self) -> int:
        return len(self.tokens)

    def mask(self, idx: torch.Tensor) -> torch.Tensor | None:
        """``(b, 1, S, S)`` pixels of the slices (None: every pixel is)."""
        if not self.valid:
            return None
        full = torch.ones(self.labels.shape[1:], dtype=torch.bool)
        return torch.stack([self.valid.get(int(v), full) for v in self.volume[idx]])[:, None]


def _batches(n: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """``(steps, batch)`` row numbers: random permutations of the ``n`` rows back to back, cut
    into batches (the reference's infinite shuffled sampler: a batch may span two epochs)."""
    gen = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n, generator=gen) for _ in range(math.ceil(steps * batch / n))]
    return torch.cat(perms)[: steps * batch].view(steps, batch)


def _sgd(
    rows: _CanvasRows,
    init: tuple[torch.Tensor, torch.Tensor],
    lr: float,
    *,
    batch: int,
    epochs: int,
    seed: int,
    size: int,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """The reference's training of one head: SGD (momentum 0.9, no weight decay), cosine
    annealing to 0 over ``epochs · ⌈n / batch⌉`` steps, stepped every batch; returns the
    weights, bias and mean loss per epoch."""
    per_epoch = math.ceil(len(rows) / batch)
    steps = epochs * per_epoch
    weight, bias = (t.clone().requires_grad_() for t in init)
    opt = torch.optim.SGD([weight, bias], lr=lr, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)
    losses, total = [], 0.0
    for step, idx in enumerate(_batches(len(rows), batch, steps, seed), start=1):
        logits = _upsample(_linear(rows.tokens[idx].float(), weight, bias), size)
        loss = dice_loss(logits, rows.labels[idx], rows.mask(idx))
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
        total += float(loss.detach())
        if step % per_epoch == 0:
            losses.append(total / per_epoch)
            total = 0.0
    return weight.detach(), bias.detach(), losses


def _canvas_counts(
    rows: _CanvasRows, weight: torch.Tensor, bias: torch.Tensor, size: int
) -> np.ndarray:
    """Per row ``(n, C, 3)`` TP/FP/FN of the head's argmax on the canvas against the
    canvas labels (the reference scores at its input size)."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(rows), 32):
            idx = torch.arange(start, min(start + 32, len(rows)))
            pred = _upsample(_linear(rows.tokens[idx].float(), weight, bias), size).argmax(dim=1)
            out.append(_counts(pred, rows.labels[idx], rows.mask(idx), weight.shape[0]))
    return np.concatenate(out)


def _seg_baharoon2023(
    data: SegData,
    tr: list[tuple[int, int]],
    va: list[tuple[int, int]],
    te: list[tuple[int, int]],
    *,
    lrs: tuple[float, ...],
    epochs: int,
    val_epochs: int,
    batch_size: int,
    seed: int,
    bootstrap: int,
) -> tuple[dict[str, Any], SegHead]:
    """The reference's procedure (segmentation.py ``run_eval_segmentation``): every lr
    trained on train (same batches, each head its own N(0, 0.01) init drawn in lr order from
    one generator), scored on val, the first best by :func:`pooled_dice` retrained from a new
    init on train then val, scored once on test."""
    if not lrs:
        raise InputError("no learning rates given; expected at least one.")
    if not va and len(lrs) > 1:
        raise InsufficientDataError(
            f"the split has no val slices, and the learning rate is chosen among {len(lrs)} "
            "on validation data only (never on test): split with a validation part "
            "(split_slices(..., val_fraction=0.15); CLI --val-fraction) or give one lr."
        )
    n_classes = len(data.classes)
    d = data.volumes[0].tokens.shape[-1]
    size = data.volumes[0].placement.size
    gen = torch.Generator().manual_seed(seed)

    def init() -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.randn(n_classes, d, generator=gen) * 0.01
        return w, torch.zeros(n_classes)

    train = _CanvasRows.of(data, tr)
    batch = min(batch_size, len(train))  # as the reference clamps it, once, to the train set
    val_dice: dict[str, float] = {}
    chosen = lrs[0]
    warnings: list[str] = []
    if va:
        val = _CanvasRows.of(data, va)
        best = 0.0
        for lr_, w0 in zip(lrs, [init() for _ in lrs], strict=True):
            w, b, _ = _sgd(train, w0, lr_, batch=batch, epochs=val_epochs, seed=seed, size=size)
            score, _ = _macro_dice(_canvas_counts(val, w, b, size).sum(axis=0))
            val_dice[f"{lr_:g}"] = score
            if score > best:  # strictly better: ties keep the earlier lr, as the reference
                best, chosen = score, lr_
        if best == 0.0:
            warnings.append("no learning rate reached a validation Dice above 0; kept the first.")
        train = train + val
    weight, bias, losses = _sgd(
        train, init(), chosen, batch=batch, epochs=epochs, seed=seed, size=size
    )
    head = SegHead(torch.zeros(d), torch.ones(d), weight, bias)

    test = _CanvasRows.of(data, te)
    per_row = _canvas_counts(test, weight, bias, size)
    vol_of = test.volume.numpy()
    volumes = sorted(set(vol_of.tolist()))
    # Resample volumes (the independent units); slices when the test holds one volume.
    units = (
        np.stack([per_row[vol_of == v].sum(axis=0) for v in volumes])
        if len(volumes) > 1
        else per_row
    )
    _, per_class = _macro_dice(units.sum(axis=0))
    odd = {
        f"{p.mode} {p.size}"
        for p in (data.volumes[v].placement for v in volumes)
        if (p.mode, p.size) != ("stretch", 448)
    }
    if odd:
        warnings.append(
            f"the entries were embedded with resize {', '.join(sorted(odd))}; the reference "
            "stretches every slice to 448 x 448 (embed with the baharoon2023-seg protocol)."
        )
    result = {
        "protocol": "seg",
        "method": "baharoon2023",
        "reference": REFERENCE,
        "classes": data.classes,
        "space": data.space,
        "n_train_slices": len(tr),
        "n_val_slices": len(va),
        "n_train_volumes": len({v for v, _ in tr}),
        "epochs": epochs,
        "val_epochs": val_epochs if va else None,
        "batch_size": batch,
        "lrs": list(lrs),
        "lr": chosen,
        "val_dice": val_dice,
        "trained_on": "train+val" if va else "train",
        "seed": seed,
        "dice": _resampled(
            len(units), lambda i: _macro_dice(units[i].sum(axis=0))[0], bootstrap, seed
        ),
        "dice_per_class": {data.classes[c]: float(per_class[c]) for c in range(1, n_classes)},
        "bootstrap_unit": "volume" if len(volumes) > 1 else "slice",
        "loss_curve": losses,
        "caveats": list(BAHAROON2023_CAVEATS),
    }
    if warnings:
        result["warnings"] = warnings
    return result, head
