"""The segmentation probe as Baharoon et al. 2023 ran it (method="baharoon2023"), checked
against the reference's definitions written out here: MONAI's Dice loss, torchmetrics'
macro Dice without background, learning rates chosen on validation only, and the SGD /
cosine training loop, on tiny synthetic patch-token grids."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from radcache.embeddings.errors import InputError, InsufficientDataError
from radcache.embeddings.preprocess import Placement
from radcache.embeddings.probes import SegData, SegVolume, dice_loss, pooled_dice, seg
from radcache.embeddings.probes.segment import split_slices

D, GRID, SIZE, ROWS, COLS = 6, 4, 16, 12, 20  # tokens 4×4×6 on a 16-pixel stretched canvas
CLASSES = ["background", "a", "b"]


def synthetic(n_vol: int = 4, n_slices: int = 6, seed: int = 0) -> SegData:
    """Patch classes drawn at random; each token its class's centre plus noise; the mask the
    patch classes on a non-square ROWS × COLS slice, stretched onto the canvas."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (3, D))
    vols = []
    for v in range(n_vol):
        lab = rng.integers(0, 3, (n_slices, GRID, GRID))
        tokens = centres[lab] + 0.4 * rng.normal(size=(n_slices, GRID, GRID, D))
        masks = np.repeat(np.repeat(lab, ROWS // GRID, 1), COLS // GRID, 2).astype(np.int16)
        place = Placement("stretch", SIZE, ROWS, COLS, SIZE, SIZE, 0, 0)
        vols.append(
            SegVolume(
                f"e{v}", f"p{v}", tokens.astype(np.float16), masks, np.arange(n_slices), place
            )
        )
    return SegData(vols, CLASSES, "synthetic")


def monai_dice_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MONAI DiceLoss(softmax=True, to_onehot_y=True), its defaults, written out."""
    p = torch.softmax(logits, dim=1)
    t = torch.stack([(labels == c).float() for c in range(logits.shape[1])], dim=1)
    inter, ground, pred = (p * t).sum((2, 3)), t.sum((2, 3)), p.sum((2, 3))
    return torch.mean(1.0 - (2.0 * inter + 1e-5) / (ground + pred + 1e-5))


def macro_dice_by_hand(pred: np.ndarray, ref: np.ndarray, n_classes: int) -> float:
    """torchmetrics Dice(average="macro", ignore_index=0) over every pixel at once."""
    values = []
    for c in range(1, n_classes):
        tp = int(((pred == c) & (ref == c)).sum())
        fp, fn = int(((pred == c) & (ref != c)).sum()), int(((pred != c) & (ref == c)).sum())
        if tp + fp + fn:
            values.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(values)) if values else 0.0


def test_the_dice_loss_is_monais() -> None:
    # One sample, two classes, two pixels; equal logits: every probability is 1/2.
    logits = torch.zeros(1, 2, 1, 2)
    labels = torch.tensor([[[0, 1]]])
    # Per class: intersection 1/2, Σp = 1, Σt = 1 → 1 − (1 + 1e-5) / (2 + 1e-5).
    expected = 1 - (1 + 1e-5) / (2 + 1e-5)
    assert float(dice_loss(logits, labels)) == pytest.approx(expected, abs=1e-7)
    # A class in neither sample: smoothing gives it (Σp + 1e-5 − 1e-5)/(Σp + 1e-5) each.
    logits = torch.tensor([[[[2.0]], [[0.0]], [[-1.0]]]]).repeat(2, 1, 1, 3)  # (2, 3, 1, 3)
    labels = torch.tensor([[[0, 0, 1]], [[1, 0, 0]]])
    p = np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum()
    per = []
    for sample in ([0, 0, 1], [1, 0, 0]):
        for c in range(3):
            t = np.asarray(sample) == c
            per.append(1 - (2 * p[c] * t.sum() + 1e-5) / (3 * p[c] + t.sum() + 1e-5))
    assert float(dice_loss(logits, labels)) == pytest.approx(np.mean(per), abs=1e-6)
    gen = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(3, 4, 5, 6, generator=gen), torch.randint(0, 3, (3, 5, 6))
    assert float(dice_loss(logits, labels)) == pytest.approx(
        float(monai_dice_loss(logits, labels)), abs=1e-6
    )


def test_pooled_dice_is_the_macro_over_foreground_of_all_pixels() -> None:
    ref = np.array([[[0, 1, 1], [2, 2, 0]], [[1, 1, 0], [0, 0, 0]]])
    pred = np.array([[[0, 1, 0], [2, 2, 2]], [[1, 0, 0], [0, 3, 0]]])
    macro, per = pooled_dice(pred, ref, 5)
    # class 1: TP 2, FP 0, FN 2 → 4/6; class 2: TP 2, FP 1 → 4/5; class 3: FP 1 → 0;
    # class 4 in neither: left out; background not counted.
    assert per[1] == pytest.approx(2 / 3) and per[2] == pytest.approx(0.8) and per[3] == 0.0
    assert np.isnan(per[4])
    assert macro == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)
    assert macro == pytest.approx(macro_dice_by_hand(pred, ref, 5))
    # Pooled over pixels, not a mean over slices (1 and 0 here): 2·1 / (2·1 + 0 + 3).
    ref = np.array([[1, 0, 0, 0], [1, 1, 1, 0]])
    assert pooled_dice(np.array([[1, 0, 0, 0], [0, 0, 0, 0]]), ref, 2)[0] == pytest.approx(0.4)
    assert pooled_dice(np.zeros((2, 2)), np.zeros((2, 2)), 3)[0] == 0.0  # torchmetrics' 0


def test_flipping_token_grid_and_target_changes_nothing() -> None:
    """Why cached features get no flip / 90° augmentation: for a 1×1 head with bilinear
    upsampling, the Dice loss and its gradient are the same for the flipped pair."""
    gen = torch.Generator().manual_seed(0)
    x, labels = torch.randn(2, D, GRID, GRID, generator=gen), torch.randint(0, 3, (2, SIZE, SIZE))
    w = torch.randn(3, D, 1, 1, generator=gen).requires_grad_()

    def loss_and_grad(xx: torch.Tensor, ll: torch.Tensor) -> tuple[float, torch.Tensor]:
        up = F.interpolate(F.conv2d(xx, w), size=(SIZE, SIZE), mode="bilinear")
        loss = dice_loss(up, ll)
        (g,) = torch.autograd.grad(loss, w)
        return float(loss.detach()), g

    base = loss_and_grad(x, labels)
    for turned in (
        loss_and_grad(x.flip(-2), labels.flip(-2)),
        loss_and_grad(x.flip(-1), labels.flip(-1)),
        loss_and_grad(x.rot90(1, (-2, -1)), labels.rot90(1, (-2, -1))),
    ):
        assert turned[0] == pytest.approx(base[0], abs=1e-6)
        assert torch.allclose(turned[1], base[1], atol=1e-6)


def reference_run(
    data: SegData, split: np.ndarray, lrs: tuple[float, ...], epochs: int, batch_size: int
) -> dict[str, Any]:
    """segmentation.py's procedure written plainly (seed 0): heads initialised N(0, 0.01)
    in lr order from one generator; batches cut from back-to-back permutations; SGD with
    momentum 0.9 at lr·(1 + cos(π t / T)) / 2; the best val Dice retrained on train+val."""
    rows = [(v, i) for v, vol in enumerate(data.volumes) for i in range(len(vol.slices))]

    def part(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = [r for r, s in zip(rows, split, strict=True) if s == name]
        x = torch.stack([torch.from_numpy(data.volumes[v].tokens[i]).float() for v, i in chosen])
        masks = [torch.from_numpy(data.volumes[v].masks[i]).float() for v, i in chosen]
        y = torch.stack(
            [
                F.interpolate(m[None, None], size=(SIZE, SIZE), mode="nearest-exact")[0, 0]
                for m in masks
            ]
        )
        return x.permute(0, 3, 1, 2), y.long()

    def logits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, w[:, :, None, None], b)
        return F.interpolate(out, size=(SIZE, SIZE), mode="bilinear", align_corners=False)

    def train(
        x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, lr: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        steps = epochs * math.ceil(len(x) / batch)
        order = torch.Generator().manual_seed(0)
        stream = torch.cat(
            [torch.randperm(len(x), generator=order) for _ in range(steps * batch // len(x) + 1)]
        )
        mom_w = mom_b = None
        for t in range(steps):
            idx = stream[t * batch : (t + 1) * batch]
            w, b = w.detach().requires_grad_(), b.detach().requires_grad_()
            gw, gb = torch.autograd.grad(monai_dice_loss(logits(x[idx], w, b), y[idx]), (w, b))
            mom_w = gw if mom_w is None else 0.9 * mom_w + gw
            mom_b = gb if mom_b is None else 0.9 * mom_b + gb
            rate = lr * (1 + math.cos(math.pi * t / steps)) / 2
            w, b = w.detach() - rate * mom_w, b.detach() - rate * mom_b
        return w.detach(), b.detach()

    x_tr, y_tr = part("train")
    x_va, y_va = part("val")
    x_te, y_te = part("test")
    batch = min(batch_size, len(x_tr))
    init = torch.Generator().manual_seed(0)
    heads = [(torch.randn(3, D, generator=init) * 0.01, torch.zeros(3)) for _ in lrs]
    val, best, chosen = {}, 0.0, lrs[0]
    for lr, (w0, b0) in zip(lrs, heads, strict=True):
        w, b = train(x_tr, y_tr, w0, b0, lr)
        score = macro_dice_by_hand(logits(x_va, w, b).argmax(1).numpy(), y_va.numpy(), 3)
        val[f"{lr:g}"] = score
        if score > best:
            best, chosen = score, lr
    w0, b0 = torch.randn(3, D, generator=init) * 0.01, torch.zeros(3)
    w, b = train(torch.cat([x_tr, x_va]), torch.cat([y_tr, y_va]), w0, b0, chosen)
    test = macro_dice_by_hand(logits(x_te, w, b).argmax(1).numpy(), y_te.numpy(), 3)
    return {"weight": w, "bias": b, "lr": chosen, "val": val, "test": test}


def test_the_procedure_equals_the_reference_loop_written_out() -> None:
    data = synthetic()
    split = split_slices(data, "blocks", blocks=6, val_fraction=0.1)
    assert set(split) == {"train", "val", "test"}
    lrs, epochs, batch = (1e-3, 3e-2, 0.3), 3, 5  # 12 train slices: batches span epochs
    res, head = seg(
        data, split, method="baharoon2023", lrs=lrs, epochs=epochs, batch_size=batch, bootstrap=20
    )
    ref = reference_run(data, split, lrs, epochs, batch)
    assert res["val_dice"] == pytest.approx(ref["val"], abs=1e-9)
    assert len(set(res["val_dice"].values())) == 3  # the choice is a real one
    assert res["lr"] == ref["lr"] and res["trained_on"] == "train+val"
    assert torch.allclose(head.weight, ref["weight"], atol=1e-5)
    assert torch.allclose(head.bias, ref["bias"], atol=1e-5)
    assert res["dice"]["value"] == pytest.approx(ref["test"], abs=1e-9)
    assert res["dice"]["low"] <= res["dice"]["value"] <= res["dice"]["high"]
    assert res["method"] == "baharoon2023" and res["batch_size"] == 5
    assert len(res["loss_curve"]) == epochs and res["caveats"]
    # Same seed, same figures.
    again, _ = seg(
        data, split, method="baharoon2023", lrs=lrs, epochs=epochs, batch_size=batch, bootstrap=20
    )
    assert again["dice"] == res["dice"]


def test_the_learning_rate_is_chosen_on_val_never_test() -> None:
    data = synthetic(n_vol=3, n_slices=8, seed=1)
    split = split_slices(data, "blocks", blocks=8, val_fraction=0.1)
    # Test slices whose labels contradict their tokens (a and b swapped): there, a head
    # that learned nothing beats one that learned the mapping.
    for v, i in [r for r, s in zip(data.rows(), split, strict=True) if s == "test"]:
        m = data.volumes[v].masks[i]
        data.volumes[v].masks[i] = np.where(m == 1, 2, np.where(m == 2, 1, 0))
    lrs = (1e-6, 0.3)
    res, _ = seg(data, split, method="baharoon2023", lrs=lrs, epochs=4, bootstrap=0)
    assert res["lr"] == 0.3 and res["val_dice"]["0.3"] > res["val_dice"]["1e-06"]
    swapped = np.where(split == "val", "test", np.where(split == "test", "val", split))
    other, _ = seg(data, swapped, method="baharoon2023", lrs=lrs, epochs=4, bootstrap=0)
    assert other["lr"] == 1e-6  # what choosing on the test slices would have done


def test_without_val_slices_only_one_lr_is_accepted() -> None:
    data = synthetic(n_vol=2, n_slices=4)
    split = split_slices(data, "blocks", blocks=4)
    assert "val" not in set(split)
    with pytest.raises(InputError, match=r"no val slices.*never on test"):
        seg(data, split, method="baharoon2023", epochs=1)
    res, _ = seg(data, split, method="baharoon2023", lr=0.1, epochs=1, bootstrap=0)
    assert res["trained_on"] == "train" and res["val_dice"] == {} and res["lr"] == 0.1
    assert any("448" in w for w in res["warnings"])  # not the reference's input size
    with pytest.raises(InputError, match="baharoon2023"):
        seg(data, split, lrs=(0.1, 0.2))


def test_a_split_without_test_slices_says_what_each_part_holds() -> None:
    data = synthetic(n_vol=2, n_slices=3)
    only_train = np.full(len(data.rows()), "train")
    with pytest.raises(InsufficientDataError, match="no test slices") as exc:
        seg(data, only_train, epochs=1)
    assert exc.value.code == "insufficient-data"
    assert "train: 6 slices of 2 patients; val: 0 slices of 0 patients" in exc.value.message
    assert "--split blocks" in exc.value.message
