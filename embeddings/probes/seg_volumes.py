"""Segmentation data on cached patch tokens, shared by both procedures of :mod:`.segment`.

:func:`seg_data` reads the stored patch-token grids of some entries together with
reference label maps (NIfTI or any volume radcache ingests, on the image's grid), taking
each mask through the same reslicing and slice selection as the image
(:class:`SegVolume`, :class:`SegData`); :func:`read_masks` reads the CSV that names them.
:class:`SegHead` is the trained probe: a linear (1×1) head on the tokens, its logits
upsampled bilinearly to the model's input canvas and taken back to each slice's own pixel
grid (:class:`~radcache.embeddings.preprocess.Placement`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..preprocess import Placement, placement, reslice
from ..recipe import Recipe
from ..store import EmbeddingStore

__all__ = ["SegData", "SegHead", "SegVolume", "read_masks", "seg_data"]


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

    def canvas_labels(self, idx: np.ndarray | None = None) -> torch.Tensor:
        """Labels on the model's input canvas, ``(n, S, S)``, resized nearest-exact as the
        reference resizes its targets (``Resize(NEAREST_EXACT)``); padding holds 0."""
        m = torch.from_numpy(self.masks if idx is None else self.masks[idx]).float()[:, None]
        m = F.interpolate(m, size=(self.placement.nr, self.placement.nc), mode="nearest-exact")
        # Already at the placed size: to_canvas only pads or crops.
        canvas = self.placement.to_canvas(m, interp="nearest")[:, 0]
        return canvas.to(torch.uint8 if int(self.masks.max(initial=0)) < 256 else torch.int16)


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
                f"entry {info.key} ({ref}) has no patch tokens; embed it again with "
                "--patch-storage fp16, int8 or pooled:N for a segmentation probe."
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


@dataclass
class SegHead:
    """The trained probe: standardisation of the tokens (none for ``baharoon2023``: mean 0,
    std 1), then a 1×1 linear map to classes."""

    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)

    def logits(self, tokens: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(n, h, w, D) tokens → (n, C, h, w) logits on the patch grid."""
        x = torch.as_tensor(tokens).float()
        return _linear((x - self.mean) / self.std, self.weight, self.bias)

    def predict(self, vol: SegVolume, idx: np.ndarray) -> np.ndarray:
        """Labels of slices ``idx`` of ``vol`` in their own pixel grid, ``(n, rows, cols)``."""
        with torch.inference_mode():
            out = []
            for start in range(0, len(idx), 32):
                part = idx[start : start + 32]
                up = _upsample(self.logits(vol.tokens[part]), vol.placement.size)
                out.append(vol.placement.from_canvas(up).argmax(dim=1).numpy().astype(np.int16))
        return np.concatenate(out) if out else np.zeros((0, *vol.masks.shape[1:]), np.int16)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 1×1 convolution: (n, h, w, D) → (n, C, h, w)."""
    return torch.einsum("nhwd,cd->nchw", x, weight) + bias.view(1, -1, 1, 1)


def _upsample(logits: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def _resampled(
    n: int, stat: Callable[[np.ndarray], float], bootstrap: int, seed: int
) -> dict[str, float]:
    """``stat`` (of unit numbers) over all ``n`` units, with a bootstrap 95 % interval over
    resampled units (resamples where it is undefined left out)."""
    if not n:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan")}
    value = stat(np.arange(n))
    rng = np.random.default_rng(seed)
    boot = [b for b in (stat(rng.integers(0, n, n)) for _ in range(bootstrap)) if np.isfinite(b)]
    low, high = np.percentile(boot or [value], [2.5, 97.5])
    return {"value": float(value), "low": float(low), "high": float(high)}


def _group(rows: Sequence[tuple[int, int]]) -> list[tuple[int, np.ndarray]]:
    """Rows gathered per volume, in order: ``[(volume, slice numbers)]``."""
    out: dict[int, list[int]] = {}
    for v, i in rows:
        out.setdefault(v, []).append(i)
    return [(v, np.asarray(ii)) for v, ii in out.items()]
