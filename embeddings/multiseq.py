"""Multi-sequence MR studies in, one entry per study out: MM-DINOv2, or a fusion baseline.

Entry point :func:`embed_study` (also :meth:`Pipeline.embed_study`). The study is read
under the pipeline's :class:`~radcache.embeddings.ingest.Limits`, as a single series is,
and since its volumes are held together, they may come to ``max_voxels`` between them.
They are named and put on one grid by :func:`~radcache.embeddings.sequences.assemble_study`.
Each sequence is then prepared with the pipeline's recipe (MM-DINOv2's default: 1–99
percentile scaling per volume, mean 0.45 / std 0.22). Then, per batch of slice positions:

* ``mm`` (an MM-DINOv2 model): one forward over every sequence of the model's
  vocabulary, missing ones masked. It stores the CLS per slice position and the patch
  grid of every sequence ``(n, S, h, w, D)``.
* ``concat`` / ``mean`` (a plain DINOv2 model, for users without MM-DINOv2 weights): each
  present sequence is embedded alone, and the per-sequence CLS tokens are concatenated
  over the vocabulary (zeros for a missing sequence, ``S·D`` wide) or averaged over the
  present ones.

The cache key covers every present sequence's pixels and geometry, the set of present
sequences, the fusion, the weights, the recipe and the precision: the same study with a
sequence more or less is another entry. Entries live in their own space, so search and
probes treat them like any other.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import xxhash

from ._budget import BatchBudget
from .cache_keys import entry_key, tenant_content
from .encode import Encoder, MMEncoder
from .errors import InputError, VolumeTooLargeError
from .ingest import InputItem, Limits, scan
from .models._registry import MM_SEQUENCES
from .preprocess import Prepared, prepare
from .pseudonyms import InputRefs, Pseudonymizer
from .recipe import Recipe
from .results import EmbedReport, Progress, SeriesResult, entry_attrs, series_result
from .sequences import FUSIONS, Fusion, Study, assemble_study
from .store import REF_FIELDS, EmbeddingStore, EntryInfo, space_id
from .store.patch_codec import encode as encode_patches

__all__ = ["FUSIONS", "Fusion", "StudyEmbedder", "embed_study"]


class StudyEmbedder(Protocol):
    """What a study is embedded with (a :class:`~radcache.embeddings.Pipeline` is one)."""

    encoder: Encoder
    store: EmbeddingStore
    pseudonymizer: Pseudonymizer
    recipe: Recipe
    patch_storage: str  # fp16 | int8 | pooled:N | none (.store.patch_codec), MM-DINOv2 only
    batching: BatchBudget  # slices per forward
    limits: Limits


def embed_study(
    pipe: StudyEmbedder,
    inputs: Iterable[InputItem],
    *,
    mapping: Mapping[str, str] | None = None,
    fusion: Fusion | None = None,
    progress: Progress | None = None,
    labels: Mapping[str, Any] | None = None,
    collection: str | None = None,
    refs: InputRefs | None = None,
) -> EmbedReport:
    """Embed the volumes in ``inputs`` as ONE multi-sequence MR study. ``fusion`` defaults to
    ``mm`` for an MM-DINOv2 model and must be ``concat`` or ``mean`` for a plain DINOv2.
    ``refs`` name the patient and study of NIfTI sequences."""
    cfg = pipe.encoder.cfg
    fusion = fusion or ("mm" if cfg.multi_sequence else None)
    if fusion not in FUSIONS:
        raise InputError(
            f"{cfg.name} is a single-sequence model: name a fusion for a multi-sequence study "
            "(concat or mean), or load an MM-DINOv2 model."
        )
    if (fusion == "mm") != cfg.multi_sequence:
        raise InputError(
            f"fusion {fusion!r} does not fit {cfg.name}: mm needs an MM-DINOv2 model, "
            "concat and mean a plain DINOv2."
        )
    limits = pipe.limits
    found = scan(list(inputs), pipe.pseudonymizer, modality="MR", refs=refs, limits=limits)
    report = EmbedReport(errors=list(found.errors), skipped=list(found.skipped))
    volumes, names, held = [], [], 0
    for cand in found.candidates:
        try:
            volume = cand.load()
            _check_held(held + volume.voxels.size, limits, cand.name)
            held += volume.voxels.size
            volumes.append(volume)
            names.append(Path(cand.name).name)
        except InputError as exc:
            report.errors.append(exc)
    vocabulary = cfg.sequences or MM_SEQUENCES
    try:
        if not volumes:
            raise InputError("no readable volume in the study; expected one per MR sequence.")
        study = assemble_study(volumes, mapping, names=names, sequences=vocabulary)
        result = _embed_assembled(pipe, study, fusion, progress)
    except InputError as exc:
        report.errors.append(exc)
        return report
    pipe.store.annotate(result.entry, labels=labels, collection=collection)
    report.series.append(result)
    return report


def _check_held(voxels: int, limits: Limits, name: str) -> None:
    """A study's volumes are held together: with the one from ``name`` they may come to
    ``limits.max_voxels``, as one series may."""
    if voxels > limits.max_voxels:
        raise VolumeTooLargeError(
            f"a multi-sequence study holds all its volumes at once, and with this one they "
            f"come to {voxels} voxels; at most {limits.max_voxels} are accepted. Send fewer "
            "or smaller (cropped or downsampled) sequences, or raise RADCACHE_MAX_VOXELS.",
            path=name,
        )


def _embed_assembled(
    pipe: StudyEmbedder, study: Study, fusion: Fusion, progress: Progress | None
) -> SeriesResult:
    t0 = time.perf_counter()
    enc, cfg = pipe.encoder, pipe.encoder.cfg
    vocabulary = cfg.sequences or MM_SEQUENCES
    ref = study.volumes[study.reference]
    recipe = pipe.recipe.resolve("MR", cfg, photometric=ref.meta.photometric)
    parts = [f"{s}:{v.content_hash()}" for s, v in study.volumes.items()]
    content = xxhash.xxh3_128_hexdigest("|".join(["multiseq-v1", fusion, *parts]).encode())
    content = tenant_content(content, pipe.pseudonymizer.tenant)
    key = entry_key(content, enc.weights_hash, recipe.hash(), enc.precision)
    model_name = cfg.name if fusion == "mm" else f"{cfg.name}+{fusion}"
    refs = {k: getattr(ref.meta, k) for k in REF_FIELDS}
    patches = pipe.patch_storage if fusion == "mm" else "none"  # a fusion keeps no grids
    cached = pipe.store.get(key, patches=patches)
    if cached is None:
        with pipe.store.claim(key):
            cached = pipe.store.get(key, patches=patches)
            if cached is None:
                prepared = {s: prepare(v, recipe, cfg) for s, v in study.volumes.items()}
                n = prepared[study.reference].n
                if progress is not None:
                    progress.total(n)
                arrays = (
                    _mm(pipe, prepared, vocabulary, progress)
                    if fusion == "mm"
                    else _fused(pipe, prepared, vocabulary, fusion, progress)
                )
                p = prepared[study.reference]
                arrays["positions"] = p.positions.astype(np.float64)
                arrays["slice_index"] = p.indices.astype(np.int32)
                attrs = _attrs(pipe, study, p, recipe, fusion, vocabulary, model_name)
                attrs["model"]["dim"] = int(arrays["cls"].shape[1])
                info: EntryInfo = pipe.store.write(key, attrs, arrays)
                return series_result(info, "miss", t0, ref.meta.warnings, refs)
    pipe.store.ensure_indexed(cached)
    pipe.store.add_alias(cached.key, refs)  # another study with the same pixels: named too
    return series_result(cached, "hit", t0, ref.meta.warnings, refs)


def _mm(
    pipe: StudyEmbedder,
    prepared: dict[str, Prepared],
    vocabulary: tuple[str, ...],
    progress: Progress | None,
) -> dict[str, np.ndarray]:
    enc = pipe.encoder
    if not isinstance(enc, MMEncoder):
        raise InputError(f"{enc.cfg.name} is not an MM-DINOv2 model.")
    first = next(iter(prepared.values()))
    n = first.n
    present = torch.tensor([s in prepared for s in vocabulary])
    cls_parts, patch_parts = [], []
    size = pipe.batching.for_prepared(enc, first, per_slice=len(vocabulary))
    for start in range(0, n, size):
        stop = min(start + size, n)
        slices = {s: p.batch(start, stop) for s, p in prepared.items()}
        blank = torch.zeros_like(next(iter(slices.values())))
        pixels = torch.stack([slices.get(s, blank) for s in vocabulary], dim=1)
        cls, patch = enc.forward_study(pixels, present.expand(stop - start, -1))
        cls_parts.append(cls.float().cpu().numpy())
        patch_parts.append(patch.to(torch.float16).cpu().numpy())
        if progress is not None:
            progress.advance(stop - start)
    cls_all = np.concatenate(cls_parts)
    patch_all = np.concatenate(patch_parts)  # (n, S, h, w, D)
    mean_patch = patch_all[:, present.numpy()].astype(np.float32).mean(axis=(1, 2, 3))
    out = {
        "cls": cls_all,
        "mean_patch": mean_patch,
        "pooled": cls_all.mean(axis=0).astype(np.float32),
    }
    out.update(encode_patches(pipe.patch_storage, patch_all))  # (n, S, h, w, D) grids
    return out


def _fused(
    pipe: StudyEmbedder,
    prepared: dict[str, Prepared],
    vocabulary: tuple[str, ...],
    fusion: Fusion,
    progress: Progress | None,
) -> dict[str, np.ndarray]:
    enc = pipe.encoder
    per: dict[str, Any] = {}
    for s, p in prepared.items():
        size = pipe.batching.for_prepared(enc, p)
        per[s] = enc.encode(p.batches(size), patch_tokens=False, last_n=0)
        if progress is not None:
            progress.advance(p.n // len(prepared))
    first = next(iter(per.values()))
    if fusion == "concat":
        zeros = np.zeros_like(first.cls)
        cls = np.concatenate([per[s].cls if s in per else zeros for s in vocabulary], axis=1)
    else:
        cls = np.mean([e.cls for e in per.values()], axis=0)
    mean_patch = np.mean([e.mean_patch for e in per.values()], axis=0)
    return {
        "cls": cls.astype(np.float32),
        "mean_patch": mean_patch.astype(np.float32),
        "pooled": cls.mean(axis=0).astype(np.float32),
    }


def _attrs(
    pipe: StudyEmbedder,
    study: Study,
    p: Prepared,
    recipe: Recipe,
    fusion: Fusion,
    vocabulary: tuple[str, ...],
    model_name: str,
) -> dict[str, Any]:
    ref = study.volumes[study.reference]
    enc, cfg = pipe.encoder, pipe.encoder.cfg
    attrs = entry_attrs(
        enc, ref, p.volume, recipe, p.grid, p.n, cls_last_n=0, tenant=pipe.pseudonymizer.tenant
    )
    attrs["patch_storage"] = pipe.patch_storage if fusion == "mm" else "none"
    attrs["model"] = {
        **attrs["model"],
        "name": model_name,
        "sequences": list(vocabulary),
        "untrained_sequences": cfg.untrained_sequences,
    }
    attrs["space"] = space_id(model_name, enc.weights_hash, recipe.space_hash())
    attrs["pooled"] = "mean of slice CLS tokens" + (
        "" if fusion == "mm" else f" ({fusion} of per-sequence CLS)"
    )
    attrs["study"] = {
        "fusion": fusion,
        "vocabulary": list(vocabulary),
        "present": study.present,
        "reference": study.reference,
        "series": {s: v.meta.series for s, v in study.volumes.items()},
        "decisions": [d.to_dict() for d in study.decisions],
    }
    return attrs
