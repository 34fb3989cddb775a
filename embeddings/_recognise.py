"""Recognising re-sent files from their keyed digests alone: no header parsed, no pixel
decoded, no model loaded (:meth:`Pipeline.recognise`, and per series inside a run).

A stored volume records which files made it (the store's file index, keyed digests) and
the names they were sent under. A DICOM series is named by its files' own UIDs; a
single-volume NIfTI file sent without patient or study references is named by its bytes,
and its modality is the submission's (part of which recipe applies), so it is recognised
only when sent with the same modality.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .cache_keys import entry_key
from .errors import InputError
from .ingest import Candidate, InputItem, expand, sniff, upload_notes
from .results import EmbedReport, SeriesResult, series_result
from .store import SHARED_FILE, EntryInfo, file_group

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["recognise", "stored_candidate"]


def _names(info: EntryInfo, refs: Mapping[str, Any]) -> bool:
    """Entry ``info`` is still named by the study, series and part of ``refs`` (its own
    names or an alias: a deleted study's are not)."""
    wanted = tuple(refs.get(k) for k in ("study", "series", "part"))
    named = (info.attrs.get("volume", {}), *info.attrs.get("aliases", []))
    return any(tuple(r.get(k) for k in ("study", "series", "part")) == wanted for r in named)


def _entry(pipe: Pipeline, content: str, rec: Mapping[str, Any]) -> EntryInfo | None:
    """The stored entry of volume ``content`` (recorded as ``rec``) under ``pipe``'s model,
    recipe, precision and patch storage."""
    enc = pipe.encoder
    recipe = pipe.recipe.resolve(rec.get("modality"), enc.cfg, photometric=rec["photometric"])
    key = entry_key(content, enc.weights_hash, recipe.hash(), enc.precision)
    return pipe.store.get(key, patches=pipe.patch_storage)


def _same_modality(rec: Mapping[str, Any], modality: str | None) -> bool:
    return (rec.get("modality") or "").upper() == (modality or "").upper()


def recognise(
    pipe: Pipeline, inputs: Iterable[InputItem], modality: str | None = None
) -> EmbedReport | None:
    """Answer a re-sent submission from file digests alone, or None to take the full path.

    Succeeds only when every input is a DICOM file or a single-volume NIfTI file already
    seen, the files make up exactly the volumes they made before, each of those is stored
    under ``pipe``'s model, recipe and precision, and still named by the study these very
    files were sent under (files with other UIDs and the same pixels make the same volume
    under other names), a NIfTI's with the same ``modality``: then no file is parsed or
    decoded, and the answer names the files' own study.
    """
    t0 = time.perf_counter()
    groups: dict[str, list[str]] = {}  # volume: the digests of its files, copies included
    nifti: set[str] = set()
    known = pipe.store.file_index()
    for item in expand(inputs, limits=pipe.limits):
        if isinstance(item, InputError):
            return None
        try:
            kind = sniff(item)  # its first bytes only
            if kind not in ("dicom", "nifti"):
                return None
            with item.spooled() as f:  # streamed: a large zip member through a file
                digest = pipe.pseudonymizer.file_digest(f)
        except (InputError, OSError):
            return None
        content = known.get(digest)
        if content is None or content == SHARED_FILE:  # new, or part of several volumes
            return None
        groups.setdefault(content, []).append(digest)
        if kind == "nifti":
            nifti.add(content)
    found: list[tuple[EntryInfo, tuple[str, ...], dict[str, Any]]] = []
    for content, sent in groups.items():
        files = set(sent)
        rec = pipe.store.volume_record(content)
        if rec is None or int(rec.get("n_files", -1)) != len(files):
            return None
        if content in nifti and not _same_modality(rec, modality):
            return None  # another recipe, or another modality to record
        refs = rec.get("groups", {}).get(file_group(files))  # None: recorded before groups
        info = _entry(pipe, content, rec)
        if info is None or refs is None or not _names(info, refs):
            return None
        found.append((info, upload_notes(rec.get("warnings", ()), len(sent) - len(files)), refs))
    if not found:
        return None
    report = EmbedReport()
    for info, notes, refs in found:
        pipe.store.ensure_indexed(info)
        report.series.append(series_result(info, "hit", t0, notes, refs))
    return report


def stored_candidate(
    pipe: Pipeline, cand: Candidate, known: Mapping[str, str]
) -> SeriesResult | None:
    """The stored entry of a DICOM candidate made of exactly the files of a stored volume
    (a series an earlier, perhaps interrupted, run committed), without reading its pixels;
    None when it must be loaded (a NIfTI file's is found by decoding it)."""
    t0 = time.perf_counter()
    contents = {known.get(d) for d in cand.files}
    if cand.source_format != "dicom" or len(contents) != 1:
        return None
    content = contents.pop()
    if content is None or content == SHARED_FILE:
        return None
    rec = pipe.store.volume_record(content)
    refs = (rec or {}).get("groups", {}).get(file_group(cand.files))
    if rec is None or refs is None or refs["study"] != cand.study:
        return None  # these files were not recorded under these names: decode them
    info = _entry(pipe, content, rec)
    if info is None:
        return None
    pipe.store.ensure_indexed(info)
    pipe.store.add_alias(info.key, refs)
    return series_result(info, "hit", t0, upload_notes(rec.get("warnings", ()), cand.resent), refs)
