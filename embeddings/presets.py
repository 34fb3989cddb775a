"""The papers' protocols as named presets: their preprocessing as a recipe, their probe.

Each :class:`Preset` pins what the paper's public code feeds the encoder, as an unresolved
:class:`~.recipe.Recipe` (it resolves per modality like any recipe, and its hash makes its
cache entries distinct from radcache's defaults), and names the probe and the probe
``method`` that reproduce its evaluation. ``caveats`` list what cached features cannot
reproduce. Select one by name: ``radcache embed --protocol NAME``, the API's ``protocol``
field, :func:`get_preset`.

Baharoon et al. 2023 (github.com/MohammedSB/DINOv2ForRadiology): CT clamped to
[-1024, 600] HU (``dinov2/data/datasets/btcv_slice.py``, ``amos.py``); MR per slice at its
5th and 95th percentiles (``msd_heart.py``, ``msd_hipp.py``; the MR classification set,
``brain_tumor.py``, sets the values at or below the 5th to 0 instead); grey stacked to three
channels; then ``dinov2/data/transforms.py``'s evaluation transform on float tensors:
``Resize((s, s), BICUBIC)`` (torchvision 0.15: no antialiasing for tensors), ``CenterCrop``,
``RescaleImage`` (per-channel min–max), ImageNet mean/std.

Scholz et al. 2025 (github.com/daniel-scholz/mm-dinov2): MONAI's
``ScaleIntensityRangePercentiles(1, 99, clip=True)`` per sequence over the crop
(``dinov2/data/datasets/glioma_supervised.py``), then ``dinov2/data/transforms.py``'s
evaluation transform with ``mean=0.45, std=0.225`` (``dinov2/eval/log_regression.py``):
``Resize((224, 224), BICUBIC, antialias=True)``, ``RescaleImage``,
``NormalizeIntensity(nonzero=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from .errors import RecipeError
from .recipe import Clip, MinMax, Recipe, Resize, SlicePercentile, load_recipe

__all__ = ["PRESETS", "Preset", "get_preset", "recipe_for"]

Probe = Literal["knn", "linear", "fewshot", "seg"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BAHAROON = (
    "Baharoon et al. 2023, Towards General Purpose Vision Foundation Models for Medical "
    "Image Analysis: An Experimental Study of DINOv2 on Radiology Benchmarks (arXiv:2312.02366)"
)
SCHOLZ = (
    "Scholz et al. 2025, MM-DINOv2: Adapting Foundation Models for Multi-Modal Medical "
    "Image Analysis (MICCAI 2025, LNCS 15967)"
)


@dataclass(frozen=True)
class Preset:
    """A paper's protocol: the preprocessing (``recipe``), the probe and how it trains."""

    name: str
    paper: str  # citation
    reference: str  # repository and files this matches
    recipe: Recipe  # unresolved; resolves per modality like any recipe
    probe: Probe | None
    method: str  # the probe function's method=
    caveats: tuple[str, ...]  # what cached features cannot reproduce


_CLASSIFY_MR = SlicePercentile(low=5.0, high=95.0, below="zero")  # brain_tumor.py
_SEGMENT_MR = SlicePercentile(low=5.0, high=95.0)  # msd_heart.py, msd_hipp.py

_BAHAROON_COMMON = (
    "The reference runs the encoder under fp16 autocast (dinov2/eval/setup.py: the eval "
    "configs' param_dtype fp16); embed with precision fp16 to match (each entry records "
    "its precision).",
    "CT: the [-1024, 600] HU clamp is that of BTCV slices and AMOS (btcv_slice.py, amos.py); "
    "the 3-D BTCV loader clamps only above 600 (btcv.py), MSD Spleen CT is clipped to its "
    "slice's 5th-95th percentiles (msd_spleen.py), and SARS-CoV-2-CT came as PNG slices "
    "with no clamp (sars_cov_2_ct.py).",
    "Modalities other than CT and MR (X-ray sets: nih_chest_xray.py, chexpert.py, mc.py, "
    "shenzhen.py) are read as stored, without clipping: min-max here, which the "
    "post-resize min-max makes equivalent.",
    "Slices reach the encoder in radcache's canonical orientation (rows toward posterior, "
    "columns toward the patient's left for axial slices); the reference slices NIfTI arrays "
    "as stored (btcv.py, msd_*.py: get_fdata().transpose(2, 0, 1)), which for most files "
    "is that image transposed (and flipped, as the affine has it); the features of a "
    "transposed image differ.",
    "A constant slice: the reference's RescaleImage divides by zero (NaN); radcache gives 0.",
)
_CLASSIFY_CAVEATS = (
    "MR: values above the slice's 95th percentile are clipped to it and those at or below "
    "its 5th set to 0, as the MR classification set's loader does (brain_tumor.py); the MR "
    "segmentation sets clip to [5th, 95th] (baharoon2023-seg).",
)


def _baharoon(
    name: str,
    probe: Probe,
    files: str,
    *,
    size: int,
    stretch_to: int | None = None,
    mr: SlicePercentile = _CLASSIFY_MR,
    caveats: tuple[str, ...] = _CLASSIFY_CAVEATS,
) -> Preset:
    """One of Baharoon et al.'s protocols: clamp or percentiles, bicubic stretch without
    antialiasing (then a centre crop to ``size``), RescaleImage, ImageNet mean/std."""
    return Preset(
        name=name,
        paper=BAHAROON,
        reference=f"github.com/MohammedSB/DINOv2ForRadiology: {files}",
        recipe=Recipe(
            per_modality={"CT": Clip(low=-1024.0, high=600.0), "MR": mr, "*": MinMax()},
            resize=Resize(
                mode="stretch", size=size, stretch_to=stretch_to, interp="bicubic", antialias=False
            ),
            rescale="minmax",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        ),
        probe=probe,
        method="baharoon2023",
        caveats=(*_BAHAROON_COMMON, *caveats),
    )


_LINEAR_AUGMENTS = (
    "Training augments each image (RandomResizedCrop(224, scale 0.75-1), horizontal flips: "
    "make_classification_train_transform); cached features are of the evaluation "
    "transform only, for training as for testing."
)

_PRESETS = (
    _baharoon(
        "baharoon2023-knn",
        "knn",
        "dinov2/data/transforms.py make_classification_eval_transform() (resize 256, crop "
        "224), dinov2/eval/classification/knn.py",
        size=224,
        stretch_to=256,
    ),
    _baharoon(
        "baharoon2023-linear",
        "linear",
        "dinov2/data/transforms.py make_classification_eval_transform(resize_size=224, "
        "crop_size=224), dinov2/eval/classification/linear.py",
        size=224,
        caveats=(*_CLASSIFY_CAVEATS, _LINEAR_AUGMENTS),
    ),
    _baharoon(
        "baharoon2023-fewshot",
        "fewshot",
        "dinov2/eval/classification/linear.py --shots (FewShotDatasetWrapper), the linear "
        "probe's transforms",
        size=224,
        caveats=(
            *_CLASSIFY_CAVEATS,
            _LINEAR_AUGMENTS,
            "The same preprocessing as baharoon2023-linear, so the same cache entries; the "
            "kNN few-shot runs (knn.py --n-per-class-list) use the kNN transform: use "
            "baharoon2023-knn's entries for those.",
        ),
    ),
    _baharoon(
        "baharoon2023-seg",
        "seg",
        "dinov2/data/transforms.py make_segmentation_eval_transforms(resize_size=448), "
        "dinov2/eval/segmentation/segmentation.py",
        size=448,
        mr=_SEGMENT_MR,
        caveats=(
            "MR: clipped to the slice's [5th, 95th] percentiles (msd_heart.py, msd_hipp.py).",
            "Training augments image and mask alike (two RandomVerticalFlip(0.25), the second "
            "meant as horizontal, and RandomRotation(90): make_segmentation_train_transforms); "
            "cached features are of the unaugmented image.",
            "Targets are resized NEAREST_EXACT to 448 (the probe's part, not the recipe's).",
        ),
    ),
    Preset(
        name="scholz2025",
        paper=SCHOLZ,
        reference="github.com/daniel-scholz/mm-dinov2: dinov2/data/datasets/"
        "glioma_supervised.py, dinov2/data/transforms.py make_classification_eval_transform(), "
        "dinov2/eval/log_regression.py",
        recipe=Recipe(
            slice_axis="axial",
            per_modality={"*": SlicePercentile(low=1.0, high=99.0, scale=True)},
            resize=Resize(mode="stretch", size=224, interp="bicubic", antialias=True),
            rescale="minmax",
            normalize="nonzero",
            mean=(0.45, 0.45, 0.45),
            std=(0.225, 0.225, 0.225),
        ),
        probe="linear",
        method="scholz2025",
        caveats=(
            "The published evaluation embeds one axial slice per study, the one with the most "
            "tumour voxels, cropped 96x96 around the tumour's centre of mass (dinov2/data/"
            "monai_transforms/io.py: LoadTumorSliced, calculate_crop_slices); send that box "
            "as the roi ({'voxels': [k, k + 1, y0, y0 + 96, x0, x0 + 96]}) to match. Without "
            "an roi every axial slice is embedded whole and the series' CLS is their mean.",
            "The classifier (dinov2/eval/log_regression.py) is cuML's GPU LogisticRegression "
            "(L-BFGS, 5 correction pairs, tol 1e-12, 1000 iterations); scikit-learn's L-BFGS-B "
            "(10 pairs) minimises the same objective to the same limits, so probabilities "
            "agree to the solvers' precision, not bit for bit.",
            "C is chosen on the first tenth of torch.randperm (seed 0) over the training rows "
            "in the reference's dataset order (its subject folders); radcache permutes them in "
            "entry-key order, so the tenth is another draw of the same size (probes."
            "logreg_reference.holdout_logreg takes the rows in any order given).",
            "log_regression.py fits on features[:, 0] of the (n, D) CLS matrix the backbone "
            "returns: the CLS token's first component alone (the name train_features_cls "
            "suggests the token was meant). radcache fits the whole CLS token; features with "
            "x[:, :1] run the published code literally.",
            "With two classes the reference's MCC (torchmetrics' binary task on (n, 2) "
            "probabilities) raises an error; radcache scores the argmax as for three.",
            "mean/std 0.45/0.225 are the evaluation's (log_regression.py); the linear "
            "evaluation uses the ImageNet values' means 0.449/0.226 "
            "(eval/classification/linear.py), self-supervised training 0.45/0.22.",
            "The evaluation transform's MONAI Resize(224, size_mode='longest') and "
            "CenterSpatialCrop(224) after the stretch change nothing at 224 and are left out.",
            "Nonzero normalisation keeps the pixels at exactly 0 at 0: after the per-channel "
            "min-max, each channel's minimum, which is the background only where no bicubic "
            "undershoot at an edge lies below it.",
            "The reference runs the encoder under fp16 autocast (eval/setup.py, "
            "param_dtype fp16); embed with precision fp16 to match.",
        ),
    ),
)

#: The presets by name.
PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in _PRESETS})


def get_preset(name: str) -> Preset:
    """The preset called ``name``; :class:`RecipeError` naming the presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise RecipeError(
            f"unknown protocol {name!r}; expected one of {', '.join(PRESETS)}."
        ) from None


def recipe_for(
    recipe: str | Path | dict[str, Any] | None = None, protocol: str | None = None
) -> Recipe | None:
    """The recipe a request names, by a recipe (file or dict) or by a preset's name, or
    None when it names neither; both at once is a :class:`RecipeError`."""
    if recipe is not None and protocol:
        raise RecipeError(
            f"a recipe and the protocol {protocol!r} were given together; give one: the "
            "protocol names its own recipe."
        )
    if protocol:
        return get_preset(protocol).recipe
    return load_recipe(recipe) if recipe is not None else None
