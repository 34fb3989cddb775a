"""Segmentation probes on cached patch tokens.

Entry points: :func:`seg_data` reads the stored patch-token grids of some entries together
with reference label maps (NIfTI or any volume radcache ingests, on the image's grid),
taking each mask through the same reslicing and slice selection as the image;
:func:`seg` trains the study's segmentation probe on it — a linear (1×1) head on the frozen
patch tokens, its logits upsampled bilinearly to the model's input canvas, a soft Dice
loss — and scores per-class Dice on held-out slices (2D) and volumes (3D, slices stacked),
in each slice's own pixel grid: predictions go back through the recipe's resize and
padding (:class:`~radcache.embeddings.preprocess.Placement`).

The PyTorch datasets for users who train their own heads are in :mod:`.datasets`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..preprocess import Placement, placement, reslice
from ..recipe import Recipe
from ..store import EmbeddingStore
from .report import Overlay
from .splits import hash_split, unknown_patients

__all__ = [
    "SegData",
    "SegHead",
    "SegVolume",
    "dice",
    "overlays",
    "read_masks",
    "seg",
    "seg_data",
    "split_slices",
]

log = logging.getLogger(__name__)


@dataclass
class SegVolume:
    """One embedded volume's patch tokens and the reference labels of its embedded slices."""

    entry: str
    patient: str  # the patient pseudonym, else the study's (patient_known False)
    tokens: np.ndarray  # (n, h, w, D) float16, as stored
    masks: np.ndarray  # (n, rows, cols) int16 labels
    slices: np.ndarray  # (n,) index of each embedded slice in the (resliced) volume
    placement: Placement
    image: np.ndarray | None = None  # (n, rows, cols) float32 intensities, for pictures
    patient_known: bool = True

    def grid_targets(self, n_classes: int, idx: np.ndarray | None = None) -> torch.Tensor:
        """Class fractions per patch, ``(n, C, h, w)``: the masks resampled to the patch grid
        (one-hot, onto the input canvas as the image went, averaged over each patch)."""
        canvas = self.canvas_targets(n_classes, idx)
        h = self.tokens.shape[1]
        return F.avg_pool2d(canvas, self.placement.size // h)

    def canvas_targets(self, n_classes: int, idx: np.ndarray | None = None) -> torch.Tensor:
        """Class fractions on the model's input canvas, ``(n, C, S, S)``."""
        m = torch.from_numpy(self.masks if idx is None else self.masks[idx]).long()
        onehot = F.one_hot(m, n_classes).permute(0, 3, 1, 2).float()
        return self.placement.to_canvas(onehot, interp="bilinear")


@dataclass
class SegData:
    """Patch tokens and masks of several volumes of one space."""

    volumes: list[SegVolume]
    classes: list[str]
    space: str

    def rows(self) -> list[tuple[int, int]]:
        """Every slice as ``(volume number, slice number within it)``."""
        return [(v, i) for v, vol in enumerate(self.volumes) for i in range(len(vol.slices))]


def _load_one(path: str | Path, what: str) -> Any:
    from ..ingest import load_volumes
    from ..pseudonyms import Pseudonymizer

    # Masks and images here are matched by geometry, never by name: any secret will do.
    vols, errors = load_volumes([str(path)], Pseudonymizer(os.urandom(32)))
    if errors:
        raise errors[0]
    if len(vols) != 1:
        raise InputError(f"{what} holds {len(vols)} volumes; expected one.", path=str(path))
    return vols[0]


def _on_grid(path: str | Path, attrs: Mapping[str, Any], what: str) -> np.ndarray:
    """The volume at ``path`` resliced as the entry was, its embedded slices only."""
    recipe = Recipe.model_validate(attrs["recipe"])
    vol = reslice(_load_one(path, what), recipe.slice_axis)
    want = tuple(attrs["geometry"]["shape"][:3])
    if vol.shape[:3] != want:
        raise InputError(
            f"{what} has shape {vol.shape[:3]} after reslicing along {recipe.slice_axis}; "
            f"expected {want}, the embedded image's: a label map on the image's own grid.",
            path=str(path),
        )
    stored = np.asarray(attrs["_positions"])
    idx = np.asarray(attrs["_slice_index"])
    here = vol.geometry.positions[idx]
    if not np.allclose(here, stored, atol=0.05):
        worst = float(np.abs(here - stored).max())
        raise InputError(
            f"{what}'s slices lie up to {worst:.2f} mm away from the embedded image's; "
            "expected a label map with the image's geometry (same affine or DICOM positions).",
            path=str(path),
        )
    return np.asarray(vol.voxels[idx])


def seg_data(
    store: EmbeddingStore,
    masks: Mapping[str, str | Path],
    *,
    classes: Sequence[str] | None = None,
    images: Mapping[str, str | Path] | None = None,
    sequence: str | None = None,
) -> SegData:
    """Stored patch tokens of the entries named in ``masks`` (entry key or series name →
    label-map file), each mask taken to the embedded slices. Multi-sequence (MM-DINOv2)
    entries give the grid of ``sequence``, or by default the mean over the sequences
    present; masks lie on the study's reference grid. ``classes`` names labels
    0, 1, …; by default ``background``, ``class 1``, …. ``images`` (same keys) adds the
    image intensities for pictures."""
    volumes: list[SegVolume] = []
    space = None
    top = 0
    for ref, path in masks.items():
        info = store.resolve(ref)
        if "patch" not in info.kinds:
            raise InputError(
                f"entry {info.key} ({ref}) has no patch tokens; embed it with --patch-tokens "
                "for a segmentation probe."
            )
        if space is not None and info.attrs["space"] != space:
            raise InputError(
                f"{ref} was embedded in space {info.attrs['space']}, the others in {space}; "
                "a probe needs features of one model and recipe."
            )
        space = info.attrs["space"]
        attrs = {
            **info.attrs,
            "_positions": store.read(info.key, "positions"),
            "_slice_index": store.read(info.key, "slice_index"),
        }
        raw = _on_grid(path, attrs, "the mask")
        lab = np.rint(raw).astype(np.int16)
        if lab.min() < 0:
            raise InputError("the mask has negative labels; expected 0, 1, 2, ….", path=str(path))
        top = max(top, int(lab.max()))
        image = None
        if images and ref in images:
            image = _on_grid(images[ref], attrs, "the image").astype(np.float32)
        geo = attrs["geometry"]
        recipe = Recipe.model_validate(attrs["recipe"])
        place = placement(recipe.resize, lab.shape[1], lab.shape[2], tuple(geo["spacing"]))
        volumes.append(
            SegVolume(
                entry=info.key,
                patient=str(info.attrs["volume"].get("patient") or info.attrs["volume"]["study"]),
                tokens=_grids(store.read(info.key, "patch"), info.attrs, sequence),
                masks=lab,
                slices=np.asarray(attrs["_slice_index"]),
                placement=place,
                image=image,
                patient_known=bool(info.attrs["volume"].get("patient")),
            )
        )
    if not volumes or space is None:
        raise InputError("no masks given; expected at least one entry with a label map.")
    names = list(classes) if classes else ["background"] + [f"class {i}" for i in range(1, top + 1)]
    if len(names) <= top:
        raise InputError(f"the masks hold label {top} but only {len(names)} class names given.")
    return SegData(volumes, names, space)


def read_masks(path: str | Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Label maps (and images, for pictures) per entry from a CSV: a key column (entry key
    or series name), ``mask``, optionally ``image``; relative paths are the CSV's."""
    import csv

    base = Path(path).parent
    masks, images = {}, {}
    with Path(path).open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "mask" not in reader.fieldnames:
            raise InputError(
                "expected a header with a key column and a 'mask' column.", path=str(path)
            )
        key = reader.fieldnames[0]
        for row in reader:
            masks[row[key]] = base / row["mask"]
            if row.get("image"):
                images[row[key]] = base / row["image"]
    return masks, images


def _grids(tokens: np.ndarray, attrs: Mapping[str, Any], sequence: str | None) -> np.ndarray:
    """``(n, h, w, D)`` patch grids; from an MM-DINOv2 entry's ``(n, S, h, w, D)``, one
    sequence's or the mean of the present ones."""
    if tokens.ndim == 4:
        return tokens
    study = attrs["study"]
    vocab, present = list(study["vocabulary"]), list(study["present"])
    if sequence is not None:
        if sequence not in present:
            raise InputError(
                f"entry has sequences {', '.join(present)}; {sequence!r} is not among them."
            )
        return np.asarray(tokens[:, vocab.index(sequence)])
    idx = [vocab.index(s) for s in present]
    return np.asarray(tokens[:, idx].astype(np.float32).mean(axis=1), dtype=np.float16)


def split_slices(
    data: SegData,
    how: Literal["patient", "blocks"] = "patient",
    *,
    test_fraction: float = 0.3,
    blocks: int = 8,
    seed: int = 0,
) -> np.ndarray:
    """``train``/``test`` per row of ``data.rows()``. ``patient``: whole patients, by a hash
    of the pseudonym (as the classification probes split); ``blocks``: each volume cut into
    ``blocks`` runs of adjacent slices, alternately train and test (for a single volume)."""
    if how == "patient":
        warning = unknown_patients([v.patient_known for v in data.volumes], "volumes")
        if warning is not None:
            log.warning("patient split: %s", warning)
        patients = [data.volumes[v].patient for v, _ in data.rows()]
        return hash_split(patients, (1 - test_fraction, test_fraction), seed, ("train", "test"))
    out = []
    for v, i in data.rows():
        n = len(data.volumes[v].slices)
        out.append("train" if (i * blocks // n) % 2 == 0 else "test")
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


@dataclass
class SegHead:
    """The trained probe: standardisation of the tokens, then a 1×1 linear map to classes."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)

    def logits(self, tokens: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(n, h, w, D) tokens → (n, C, h, w) logits on the patch grid."""
        x = torch.as_tensor(tokens).float()
        x = (x - self.mean) / self.std
        return torch.einsum("nhwd,cd->nchw", x, self.weight) + self.bias.view(1, -1, 1, 1)

    def predict(self, vol: SegVolume, idx: np.ndarray) -> np.ndarray:
        """Labels of slices ``idx`` of ``vol`` in their own pixel grid, ``(n, rows, cols)``."""
        with torch.inference_mode():
            out = []
            for start in range(0, len(idx), 32):
                part = idx[start : start + 32]
                up = _upsample(self.logits(vol.tokens[part]), vol.placement.size)
                out.append(vol.placement.from_canvas(up).argmax(dim=1).numpy().astype(np.int16))
        return np.concatenate(out) if out else np.zeros((0, *vol.masks.shape[1:]), np.int16)


def _upsample(logits: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


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
    if not len(v):
        return {"value": float("nan"), "low": float("nan"), "high": float("nan")}
    rng = np.random.default_rng(seed)
    boot = [v[rng.integers(0, len(v), len(v))].mean() for _ in range(bootstrap)] or [v.mean()]
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"value": float(v.mean()), "low": float(low), "high": float(high)}


def seg(
    data: SegData,
    split: np.ndarray,
    *,
    epochs: int = 100,
    batch_size: int = 16,
    lr: float = 3e-2,
    seed: int = 0,
    bootstrap: int = 1000,
) -> tuple[dict[str, Any], SegHead]:
    """Train the linear segmentation probe on the ``train`` rows, score the ``test`` rows.

    Returns the figures (per-class 2D Dice: mean over test slices; 3D Dice: per test
    volume, its test slices stacked; both with bootstrap 95 % intervals; the loss per
    epoch) and the trained head."""
    rows = data.rows()
    n_classes = len(data.classes)
    tr = [rows[i] for i in np.flatnonzero(split == "train")]
    te = [rows[i] for i in np.flatnonzero(split == "test")]
    if not tr or not te:
        raise InputError(f"the split left {len(tr)} train and {len(te)} test slices; need both.")
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

    per_slice, per_volume = [], []
    for v, idx in _group(te):
        vol = data.volumes[v]
        pred, ref = head.predict(vol, idx), vol.masks[idx]
        per_slice += [dice(p, r, n_classes) for p, r in zip(pred, ref, strict=True)]
        per_volume.append(dice(pred, ref, n_classes))
    s2, s3 = np.asarray(per_slice), np.asarray(per_volume)
    fg = range(1, n_classes)
    result = {
        "protocol": "seg",
        "classes": data.classes,
        "space": data.space,
        "n_train_slices": len(tr),
        "n_test_slices": len(te),
        "n_train_volumes": len({v for v, _ in tr}),
        "n_test_volumes": len(s3),
        "epochs": epochs,
        "lr": lr,
        "seed": seed,
        "dice_2d": {data.classes[c]: _interval(s2[:, c], bootstrap, seed) for c in fg},
        "dice_3d": {data.classes[c]: _interval(s3[:, c], bootstrap, seed) for c in fg},
        "loss_curve": losses,
    }
    return result, head


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


def _group(rows: Sequence[tuple[int, int]]) -> list[tuple[int, np.ndarray]]:
    """Rows gathered per volume, in order: ``[(volume, slice numbers)]``."""
    out: dict[int, list[int]] = {}
    for v, i in rows:
        out.setdefault(v, []).append(i)
    return [(v, np.asarray(ii)) for v, ii in out.items()]
