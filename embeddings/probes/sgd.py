"""The linear probe of the DINOv2 evaluation as Baharoon et al. 2023 ran it
(MohammedSB/DINOv2ForRadiology, dinov2/eval/classification/linear.py and utils.py): SGD
heads on raw cached features over a grid of feature sets and learning rates, chosen on
validation rows, retrained, scored on test (:class:`SGDHead`). Torch is imported when a
head trains."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import InputError
from .featureset import LAST, Features
from .scoring import _mean, _per_class_auroc
from .targets import _first_best, _need_val, _predictions, _score, _targets

if TYPE_CHECKING:
    import torch

__all__ = ["AVGPOOLS", "BLOCKS", "LR_GRID", "SGDHead"]

LR_GRID = (1e-3, 5e-3, 1e-2, 5e-2)  # linear.py's --learning-rates default
BLOCKS = (1, 4)  # linear.py's --n-last-blocks default
AVGPOOLS = (True, False)  # linear.py's --avgpools default


@dataclass(frozen=True)
class SGDHead:
    """The training procedure of linear.py (method="baharoon2023"): a linear head on raw
    features, weights drawn from N(0, 0.01²), bias 0; SGD (momentum 0.9, no weight decay)
    with a cosine schedule to 0 over ``epochs`` × ⌈n / batch⌉ steps, batches of
    ``min(batch_size, n)`` cut from DINOv2's ``InfiniteSampler`` stream; every cell of
    ``blocks`` × ``avgpools`` × ``lrs`` is trained (``val_epochs`` epochs if given), the best
    by validation ``val_metric`` is retrained for ``epochs`` and scored on test."""

    lrs: tuple[float, ...] = LR_GRID
    blocks: tuple[int, ...] = BLOCKS
    avgpools: tuple[bool, ...] = AVGPOOLS
    epochs: int = 10
    val_epochs: int | None = None
    batch_size: int = 128
    val_metric: Literal["auroc", "accuracy"] = "auroc"

    def __post_init__(self) -> None:
        if not (self.lrs and self.blocks and self.avgpools):
            raise InputError("SGDHead needs at least one learning rate, block count and avgpool.")
        if min(self.epochs, self.val_epochs or 1, self.batch_size, *self.blocks) < 1:
            raise InputError("SGDHead's epochs, val_epochs, batch_size and blocks must be ≥ 1.")
        if self.val_metric not in ("auroc", "accuracy"):
            raise InputError(f"val_metric {self.val_metric!r}: expected auroc or accuracy.")


def _reference_order(n: int, count: int, seed: int) -> np.ndarray:
    """The first ``count`` indices of DINOv2's shuffled ``InfiniteSampler`` over ``n`` rows
    (dinov2/data/samplers.py): one torch generator seeded ``seed`` draws permutation after
    permutation by ``_generate_randperm_indices`` (at each i a swap with ``randint(i, n)``);
    a batch may span two of them.

    On the CPU, ``randint(i, n)`` is ``i + r % (n - i)`` for the next 32-bit output ``r`` of
    torch's MT19937, seeded as NumPy's legacy ``RandomState(seed)`` is: the outputs are drawn
    from NumPy at once rather than one torch call at a time."""
    draws = np.random.RandomState(seed).randint(0, 2**32, count, dtype=np.uint32).tolist()
    out = np.empty(count, np.int64)
    perm: list[int] = []
    for t, r in enumerate(draws):
        i = t % n
        if i == 0:
            perm = list(range(n))
        j = i + r % (n - i)
        perm[i], perm[j] = perm[j], perm[i]
        out[t] = perm[i]
    return out


def _linear_input(f: Features, blocks: int, avgpool: bool) -> np.ndarray:
    """``create_linear_input`` of dinov2/eval/classification/utils.py on cached features:
    the CLS of the last ``blocks`` blocks, then (``avgpool``) the mean patch token, cut from
    a ``cls_last4+meanpatch`` matrix."""
    if f.kind != "cls_last4+meanpatch":
        raise InputError(
            f"method='baharoon2023' trains on 'cls_last4+meanpatch' features; got {f.kind!r} "
            "(features(kind='cls_last4+meanpatch'); the CLI's --protocol picks it)."
        )
    n = int(f.meta.get("cls_blocks", LAST))
    d = f.x.shape[1] // (n + 1)
    cols = [f.x[:, (n - min(blocks, n)) * d : n * d]]
    if avgpool:
        cols.append(f.x[:, n * d :])
    return np.ascontiguousarray(np.concatenate(cols, axis=1), dtype=np.float32)


def _task(classes: Sequence[str], multilabel: bool) -> tuple[str, int]:
    """linear.py's head: one logit and BCE for two classes, cross-entropy for more,
    one BCE logit per class for label sets."""
    if len(classes) < 2:
        raise InputError(f"a linear probe needs at least 2 classes; got {list(classes)}.")
    if multilabel:
        return "multilabel", len(classes)
    return ("binary", 1) if len(classes) == 2 else ("multiclass", len(classes))


def _loss(task: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    if task == "binary":
        return F.binary_cross_entropy_with_logits(logits[:, 0], target)
    if task == "multiclass":
        return F.cross_entropy(logits, target)
    # linear.py sums each example's class-mean BCE over the batch
    return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[1]


def _target(task: str, y: np.ndarray) -> np.ndarray:
    return y.astype(np.int64 if task == "multiclass" else np.float32)


def _train_head(
    x: np.ndarray,
    target: np.ndarray,
    task: str,
    n_out: int,
    order: np.ndarray,
    *,
    lr: float,
    steps: int,
    batch: int,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One head trained as linear.py trains it (see :class:`SGDHead`); weight and bias."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    w = torch.empty(n_out, x.shape[1]).normal_(0.0, 0.01, generator=g).requires_grad_()
    b = torch.zeros(n_out, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=lr, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)
    xt, tt, idx = torch.from_numpy(x), torch.from_numpy(target), torch.from_numpy(order)
    for i in range(steps):
        rows = idx[i * batch : (i + 1) * batch]
        loss = _loss(task, F.linear(xt[rows], w, b), tt[rows])
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        sched.step()
    return w.detach(), b.detach()


def _sigmoid(x: np.ndarray, w: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """``LinearPostprocessor``: a sigmoid on every logit (cross-entropy heads too)."""
    import torch

    with torch.no_grad():
        return torch.sigmoid(torch.nn.functional.linear(torch.from_numpy(x), w, b)).numpy()


def _indicator(task: str, y: np.ndarray, n_out: int) -> np.ndarray:
    if task == "binary":
        return y[:, None]
    return np.eye(n_out, dtype=np.int64)[y] if task == "multiclass" else y


def _val_score(task: str, y: np.ndarray, s: np.ndarray, metric: str) -> float:
    """The validation figure of linear.py's metric types: macro AUROC over the columns
    (``BinaryAUROC``, ``MulticlassAUROC`` and ``MultilabelAUROC`` on sigmoid scores) or
    accuracy (``MEAN_ACCURACY``; label sets: per-class accuracy at 0.5, averaged)."""
    ind = _indicator(task, y, s.shape[1])
    if metric == "auroc":
        return _mean(_per_class_auroc(ind, s))
    if task == "multiclass":
        return float(np.mean(s.argmax(axis=1) == y))
    return float(np.mean((s > 0.5) == ind))


def _sgd_linear(
    tr: Features,
    va: Features,
    te: Features,
    fit: Features,
    label: str,
    *,
    head: SGDHead,
    seed: int,
    bootstrap: int,
    multilabel: bool,
) -> dict[str, Any]:
    """linear.py's run: every setting trained on ``tr`` and scored on ``va``; the best
    retrained on ``fit`` and scored on ``te``."""
    classes, (ytr, yva, yte, yfit) = _targets(label, (tr, va, te, fit), multilabel)
    task, n_out = _task(classes, multilabel)
    n_blocks = int(tr.meta.get("cls_blocks", LAST))
    batch = min(head.batch_size, len(tr))  # linear.py caps the batch at the training set once
    settings = [
        (b, a, lr)
        for b in dict.fromkeys(min(b, n_blocks) for b in head.blocks)
        for a in head.avgpools
        for lr in head.lrs
    ]
    _need_val(
        va, label, "the feature set and learning rate", len(settings),
        "a single setting (SGDHead with one learning rate, block count and avgpool)",
    )  # fmt: skip
    orders: dict[tuple[int, int], np.ndarray] = {}  # every setting sees the same batches

    def name(b: int, a: bool, lr: float) -> str:
        return f"blocks={b} avgpool={a} lr={lr:g}"

    def train(f: Features, y: np.ndarray, setting: tuple[int, bool, float], epochs: int) -> Any:
        b, a, lr = setting
        steps = epochs * math.ceil(len(f) / batch)
        key = (len(f), steps * batch)
        if key not in orders:
            orders[key] = _reference_order(*key, seed)
        x = _linear_input(f, b, a)
        return _train_head(
            x,
            _target(task, y),
            task,
            n_out,
            orders[key],
            lr=lr,
            steps=steps,
            batch=batch,
            seed=seed,
        )

    grid: dict[str, float] = {}
    for s in settings if len(settings) > 1 else ():
        w, b = train(tr, ytr, s, head.val_epochs or head.epochs)
        grid[name(*s)] = _val_score(
            task, yva, _sigmoid(_linear_input(va, *s[:2]), w, b), head.val_metric
        )
    best = settings[[name(*s) for s in settings].index(_first_best(grid))] if grid else settings[0]
    w, b = train(fit, yfit, best, head.epochs)
    sig = _sigmoid(_linear_input(te, *best[:2]), w, b)
    proba = np.concatenate([1 - sig, sig], axis=1) if task == "binary" else sig
    return {
        "classes": classes,
        "head": {
            "task": task,
            "epochs": head.epochs,
            "val_epochs": head.val_epochs,
            "batch_size": batch,
            "val_metric": head.val_metric,
            "n_fit": len(fit),
        },
        f"val_{head.val_metric}_by_setting": grid,
        "setting": {"blocks": best[0], "avgpool": best[1], "lr": best[2]},
        "test": _score(yte, proba, classes, multilabel, bootstrap, True),
        "predictions": _predictions(te, classes, yte, proba),
    }
