"""Pipeline: ingest → preprocess → encode → store, one volume at a time.

Entry point :class:`Pipeline` (``Pipeline.embed(inputs)``). It composes the stage
modules and adds only the cache logic: a volume whose key (pixels + geometry, weights,
recipe, precision) is already stored runs no model forward.

Memory is that of one series: :func:`~radcache.embeddings.ingest.scan` reads the headers
of the whole input (small: no pixels), then each series is loaded, embedded, committed
and let go before the next is read. An interrupted run therefore keeps every series it
committed, and running it again answers those from the cache (from their files' digests,
without reading their pixels) and embeds the rest.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from . import _recognise
from ._budget import BatchBudget
from ._overlap import StageTimes
from ._stream import embed_candidates, encode_prepared
from ._version import __version__
from .cache_keys import entry_key, tenant_content
from .encode import Encoder
from .errors import InputError, InvalidFieldError, RadcacheError
from .ingest import Candidate, InputItem, Limits, dicom_among, scan, upload_notes
from .patch_forms import DEFAULT_PATCH_STORAGE, parse_storage
from .pseudonyms import InputRefs, Pseudonymizer
from .recipe import Recipe
from .results import (
    EmbedReport,
    Progress,
    SeriesResult,
    Transient,
    entry_attrs,
    series_result,
    unknown_modality,
)
from .sequences import Fusion
from .settings import Settings
from .store import (
    REF_FIELDS,
    EmbeddingStore,
    EntryInfo,
    space_id,
)
from .store.patch_codec import patch_layout, put_patches
from .volume import Volume

__all__ = ["EmbedReport", "Pipeline", "Progress", "SeriesResult", "Transient", "__version__"]

log = logging.getLogger(__name__)


def _refs(volume: Volume) -> dict[str, Any]:
    """The names ``volume`` was sent under: an entry's own, or an alias of it."""
    return {k: getattr(volume.meta, k) for k in REF_FIELDS}


class Pipeline:
    """Embeds volumes with one encoder into one store, skipping what is cached."""

    def __init__(
        self,
        encoder: Encoder,
        store: EmbeddingStore,
        pseudonymizer: Pseudonymizer,
        *,
        recipe: Recipe | None = None,
        patch_storage: str | bool = DEFAULT_PATCH_STORAGE,  # fp16|int8|pooled:N|none: patch_codec
        patch_tokens: bool | None = None,  # the older flag: True is fp16, False none
        cls_last_n: int = 4,
        batch_size: int | None = None,  # at most; None: 32 on a CPU, 512 on CUDA (_budget)
        batch_memory: int | None = None,  # bytes one forward may use; None: _budget's auto
        limits: Limits | None = None,
        overlap: bool = False,
    ) -> None:
        self.encoder = encoder
        self.store = store
        self.pseudonymizer = pseudonymizer
        self.recipe = recipe or Recipe()
        self.patch_storage = parse_storage(patch_storage if patch_tokens is None else patch_tokens)
        self.cls_last_n = min(cls_last_n, encoder.cfg.depth)
        self.batching = BatchBudget(batch_size, batch_memory)  # slices per forward
        self.limits = limits or Limits()  # what one submission may declare and inflate to
        self.overlap = overlap  # decode, preprocessing and forward overlapped: _stream
        self.profile = StageTimes()  # seconds per stage, every run of this pipeline's
        store.bind_pseudonyms(pseudonymizer.fingerprint())

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        encoder: Encoder | None = None,
        background: bool = False,
        lazy: bool = False,
    ) -> Pipeline:
        """The pipeline the settings describe: model (loaded here unless given; its weights
        on a thread of their own with ``background``, or only once a cache miss needs them
        with ``lazy``, see :func:`.encode.load_encoder`), store, pseudonym secret, recipe
        and output choices."""
        from .encode import load_encoder
        from .recipe import load_recipe
        from .store import open_store

        locks = settings.store_locks()  # an unlocked object store: refused before the model loads
        enc = encoder or load_encoder(
            settings.model,
            device=settings.device,
            precision=settings.precision,
            cache_dir=settings.hf_cache_dir,
            offline=settings.offline,
            background=background,
            hashes=settings.weights_hash_file,
            lazy=lazy,
            compile=settings.compile,
        )
        return cls(
            enc,
            open_store(settings.store, mode="a", locks=locks),
            settings.pseudonymizer(),
            recipe=load_recipe(settings.recipe),
            patch_storage=settings.patch_storage,
            cls_last_n=settings.cls_last_n,
            batch_size=settings.batch_size,
            batch_memory=settings.batch_memory_bytes,
            limits=Limits(settings.max_voxels, settings.max_decompressed_bytes),
            overlap=settings.overlap,
        )

    def embed(
        self,
        inputs: Iterable[InputItem],
        *,
        modality: str | None = None,
        progress: Progress | None = None,
        labels: Mapping[str, Any] | None = None,
        collection: str | None = None,
        recognise: bool = True,
        refs: InputRefs | None = None,
    ) -> EmbedReport:
        """Embed everything found in ``inputs``; bad inputs are reported, the rest goes on.

        ``labels`` (e.g. ``{"diagnosis": "pneumonia"}``) are recorded with every entry the
        submission names, for few-shot classification and probes; ``collection`` adds
        them to a named collection that searches can be restricted to. ``refs`` name the
        patient and study of non-DICOM inputs (:meth:`check_refs`: a submission with
        references holds no DICOM file). ``recognise=False`` skips :meth:`recognise` (its
        caller has tried it already) and the per-series answer from file digests, which
        reads the store's whole file index; a stored series is then still a cache hit,
        found by decoding it.
        """
        inputs = list(inputs)
        self.check_refs(inputs, refs)
        known = self.recognise(inputs, modality) if recognise and not refs else None
        if known is not None:
            if progress is not None:
                progress.total(sum(r.slices for r in known.series))
                progress.advance(sum(r.slices for r in known.series))
            report = known
        else:
            report = self._embed(inputs, modality, progress, by_digest=recognise, refs=refs)
        self.label(report, labels=labels, collection=collection)
        return report

    def check_refs(self, inputs: Iterable[InputItem], refs: InputRefs | None) -> None:
        """Refuse patient and study references given with DICOM files, which are named by
        their own PatientID and StudyInstanceUID (:class:`InvalidFieldError` naming the
        first DICOM file); nothing is read without references."""
        if not refs:
            return
        dicom = dicom_among(inputs, self.limits)
        if dicom is not None:
            raise InvalidFieldError(
                "patient and study references name NIfTI, NRRD and MetaImage volumes; this "
                "file is DICOM, named by its own PatientID and StudyInstanceUID. Send DICOM "
                "files without patient/study, in a submission of their own.",
                path=dicom,
            )

    def label(
        self,
        report: EmbedReport,
        *,
        labels: Mapping[str, Any] | None = None,
        collection: str | None = None,
    ) -> None:
        """Record ``labels`` and ``collection`` with every entry ``report`` names."""
        for r in report.series:
            self.store.annotate(r.entry, labels=labels, collection=collection)

    def embed_study(
        self,
        inputs: Iterable[InputItem],
        *,
        mapping: Mapping[str, str] | None = None,
        fusion: Fusion | None = None,
        progress: Progress | None = None,
        labels: Mapping[str, Any] | None = None,
        collection: str | None = None,
        refs: InputRefs | None = None,
    ) -> EmbedReport:
        """Everything in ``inputs`` as ONE multi-sequence MR study (one NIfTI or series per
        sequence) → one entry: MM-DINOv2, or with a plain DINOv2 the ``concat``/``mean``
        fusion of per-sequence CLS tokens. ``mapping`` names sequences by series or file
        name; the rest are guessed (:mod:`.sequences`). ``refs`` name the patient and study
        of NIfTI sequences (as for :meth:`embed`). See :mod:`.multiseq`."""
        from .multiseq import embed_study

        inputs = list(inputs)
        self.check_refs(inputs, refs)
        return embed_study(
            self,
            inputs,
            mapping=mapping,
            fusion=fusion,
            progress=progress,
            labels=labels,
            collection=collection,
            refs=refs,
        )

    def embed_transient(
        self, inputs: Iterable[InputItem], *, modality: str | None = None
    ) -> tuple[list[Transient], list[RadcacheError]]:
        """Embed ``inputs`` without writing anything (a query by upload); a volume already
        stored is read back instead of recomputed."""
        found = scan(list(inputs), self.pseudonymizer, modality=modality, limits=self.limits)
        out: list[Transient] = []
        errors: list[RadcacheError] = list(found.errors)
        for cand in found.candidates:
            try:
                volume = cand.load()
                key, recipe = self.key_for(volume)
                space = space_id(
                    self.encoder.cfg.name, self.encoder.weights_hash, recipe.space_hash()
                )
                meta = volume.meta.to_dict()
                if self.store.get(key) is not None:
                    cls = self.store.read(key, "cls")
                    out.append(Transient(key, space, meta, self.store.read(key, "pooled"), cls))
                    continue
                from .preprocess import prepare

                prepared = prepare(volume, recipe, self.encoder.cfg)
                emb = self.encoder.encode(
                    prepared.batches(self.batching.for_prepared(self.encoder, prepared)),
                    patch_tokens=False,
                    last_n=0,
                )
                out.append(Transient(key, space, meta, emb.pooled, emb.cls))
            except InputError as exc:
                errors.append(exc)
        return out, errors

    def variant(
        self,
        *,
        recipe: Recipe | None = None,
        patch_storage: str | bool | None = None,
        tenant: str | None = None,
    ) -> Pipeline:
        """The same encoder and store with another recipe, patch storage or tenant."""
        other = copy.copy(self)
        if tenant is not None:
            other.pseudonymizer = self.pseudonymizer.for_tenant(tenant)
        if recipe is not None:
            other.recipe = recipe
        if patch_storage is not None:
            other.patch_storage = parse_storage(patch_storage)
        return other

    def _embed(
        self,
        inputs: list[InputItem],
        modality: str | None,
        progress: Progress | None,
        *,
        by_digest: bool,
        refs: InputRefs | None = None,
    ) -> EmbedReport:
        found = scan(inputs, self.pseudonymizer, modality=modality, limits=self.limits, refs=refs)
        report = EmbedReport(errors=list(found.errors), skipped=list(found.skipped))
        if progress is not None:
            progress.total(sum(c.n_slices for c in found.candidates))
        known = self.store.file_index() if by_digest else {}
        t0 = time.perf_counter()
        embed_candidates(self, found.candidates, known, report, progress)
        slices = sum(r.slices for r in report.series if r.cache == "miss")
        self.profile.run(time.perf_counter() - t0, slices)
        return report

    def _stored_candidate(self, cand: Candidate, known: Mapping[str, str]) -> SeriesResult | None:
        """A DICOM series' stored entry from its files' digests, or None (:mod:`._recognise`)."""
        return _recognise.stored_candidate(self, cand, known)

    def _embed_candidate(
        self, cand: Candidate, progress: Progress | None, volume: Volume
    ) -> SeriesResult:
        result = self.embed_volume(volume, progress=progress)
        if progress is not None and result.cache == "hit":
            progress.advance(cand.n_slices)
        if cand.files:
            m = volume.meta
            record = {
                **_refs(volume),
                "modality": m.modality,
                "photometric": m.photometric,
                "n_files": len(cand.files),
                "n_slices": volume.n_slices,
                "warnings": list(upload_notes(result.warnings, 0)),  # not this upload's count
            }
            self.store.remember_files(self.content_of(volume), cand.files, record)
        return result

    def recognise(
        self, inputs: Iterable[InputItem], modality: str | None = None
    ) -> EmbedReport | None:
        """Answer a re-sent submission from its files' digests alone, or None to take the
        full path (:func:`._recognise.recognise`: DICOM files, and single-volume NIfTI files
        sent without references and with the same ``modality``)."""
        return _recognise.recognise(self, inputs, modality)

    @property
    def tenant(self) -> str:
        """The tenant this pipeline names, keys and stores for."""
        return self.pseudonymizer.tenant

    def content_of(self, volume: Volume) -> str:
        """The content identity of ``volume`` in this pipeline's tenant (its cache key's)."""
        return tenant_content(volume.content_hash(), self.tenant)

    def key_for(self, volume: Volume) -> tuple[str, Recipe]:
        """The cache key of ``volume`` under this pipeline's model, recipe and precision."""
        cfg = self.encoder.cfg
        recipe = self.recipe.resolve(volume.meta.modality, cfg, photometric=volume.meta.photometric)
        key = entry_key(
            self.content_of(volume),
            self.encoder.weights_hash,
            recipe.hash(),
            self.encoder.precision,
        )
        return key, recipe

    def embed_volume(self, volume: Volume, *, progress: Progress | None = None) -> SeriesResult:
        """Embed one volume, or return the stored entry if its key is cached. A NIfTI,
        NRRD or MetaImage volume sent without a modality is warned about
        (:func:`unknown_modality`)."""
        t0 = time.perf_counter()
        key, recipe = self.key_for(volume)
        meta = volume.meta
        if meta.source_format != "dicom" and not meta.modality:
            warning = unknown_modality(meta, self.recipe, self.encoder.cfg)
            meta = dataclasses.replace(meta, warnings=(*meta.warnings, warning))
        refs = _refs(volume)
        cached = self.store.get(key, patches=self.patch_storage)  # None: poorer patches too
        if cached is None:
            with self.store.claim(key):
                # Another process may have stored it while this one waited for the claim.
                cached = self.store.get(key, patches=self.patch_storage)
                if cached is None:
                    info = self._write(volume, key, recipe, progress)
                    return series_result(info, "miss", t0, meta.warnings, refs)
        self.store.ensure_indexed(cached)
        self.store.add_alias(key, refs)
        return series_result(cached, "hit", t0, meta.warnings, refs)

    def _write(
        self, volume: Volume, key: str, recipe: Recipe, progress: Progress | None
    ) -> EntryInfo:
        """Encode ``volume`` and store it under ``key``, patch grids streamed as they come."""
        from .preprocess import prepare

        with self.profile.timed("preprocess"):
            prepared = prepare(volume, recipe, self.encoder.cfg)
        n, d, (h, w) = prepared.n, self.encoder.cfg.dim, prepared.grid
        layout: dict[str, tuple[tuple[int, ...], Any]] = {
            "cls": ((n, d), np.float32),
            "mean_patch": ((n, d), np.float32),
            "pooled": ((d,), np.float32),
            "positions": ((n, 3), np.float64),
            "slice_index": ((n,), np.int32),
        }
        layout.update(patch_layout(self.patch_storage, (n, h, w, d)))
        if self.cls_last_n:
            layout["cls_last"] = ((n, self.cls_last_n, d), np.float32)
        # Patch grids go to the store batch by batch as they come (never all in memory);
        # the entry stays invisible until commit().
        writer = self.store.begin(key, layout)
        emb = encode_prepared(
            self,
            prepared,
            patch_tokens=self.patch_storage != "none",
            last_n=self.cls_last_n,
            progress=progress,
            on_batch=functools.partial(put_patches, writer, self.patch_storage),
        )
        # The small per-slice arrays are one chunk each: written once, whole.
        t_write = time.perf_counter()
        writer.put("cls", 0, emb.cls)
        writer.put("mean_patch", 0, emb.mean_patch)
        if emb.cls_last is not None:
            writer.put("cls_last", 0, emb.cls_last)
        writer.put("pooled", 0, emb.pooled)
        writer.put("positions", 0, prepared.positions.astype(np.float64))
        writer.put("slice_index", 0, prepared.indices.astype(np.int32))
        attrs = entry_attrs(
            self.encoder,
            volume,
            prepared.volume,
            recipe,
            prepared.grid,
            n,
            self.cls_last_n,
            tenant=self.tenant,
            patch_storage=self.patch_storage,
        )
        info = writer.commit(attrs, emb.pooled, emb.cls)
        self.profile.add("write", time.perf_counter() - t_write)
        return info
