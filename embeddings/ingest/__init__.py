"""Ingest: files in, :class:`~radcache.embeddings.volume.Volume` values out.

The entry point is :func:`scan`: it expands inputs (files, directories, zips, uploaded
bytes), reads every header once, assembles DICOM series, and returns one
:class:`Candidate` per volume to be. A scan holds headers only: a DICOM file is read to
digest it and parse its header without pixel data, and only the facts assembly needs are
kept; a NIfTI, NRRD or MHA file is hashed as a stream and only its header is parsed. The
voxels are read from the files (or zip members, or the caller's bytes) again when
``load()`` is called, and the candidate keeps nothing of them, so an archive is processed
one series at a time in the memory of one series. Bad files become
:class:`~radcache.embeddings.errors.InputError` values in ``errors``; the rest go on.
A scan and its candidates' loads share one set of :class:`Limits` (voxels a header may
declare, bytes the input may inflate to), checked before the expensive work.

Names are made here: a DICOM series by the keyed pseudonyms of its UIDs and PatientID, a
NIfTI/NRRD/MetaImage file (which has no UID) by the keyed pseudonym of its hash, and by
the patient and study the sender named, pseudonymised as DICOM's are
(:class:`~radcache.embeddings.pseudonyms.InputRefs`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._lazy import lazy_names
from ..errors import InputError, NotDicomError
from ..pseudonyms import InputRefs, Pseudonymizer
from ..volume import Volume
from ._decode_pool import use_workers as use_decode_workers
from ._dicom_assemble import DicomSeries, assemble, upload_notes
from ._limits import Budget, Limits
from ._sources import InputItem, Source, expand, expand_within, sniff
from ._volumes import open_itk, open_nifti

# pydicom (about 0.3 s to import) loads with the first DICOM file read, not before: a
# NIfTI input, or a re-sent DICOM study recognised from its files' digests, never needs it.
if TYPE_CHECKING:
    from ._dicom_read import Frame
    from .instances import InstanceIds, cut_short, instance_ids

_WHERE = {"InstanceIds": "instances", "cut_short": "instances", "instance_ids": "instances"}

__all__ = [
    "Candidate",
    "InputItem",
    "InstanceIds",
    "Limits",
    "ScanResult",
    "Source",
    "cut_short",
    "dicom_among",
    "expand",
    "instance_ids",
    "load_volumes",
    "scan",
    "sniff",
    "upload_notes",
    "use_decode_workers",
]

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """A volume found in the input, not read yet: it holds headers, never pixels."""

    name: str  # for messages: a file name, or the first file of a series
    source_format: str
    n_slices: int
    study: str
    series: str
    part: str
    loader: Callable[[], Volume] = field(repr=False)
    files: frozenset[str] = frozenset()  # keyed digests of the files it came from (DICOM,
    # or a single-volume NIfTI sent without references)
    resent: int = 0  # its instances this upload sent more than once

    def load(self) -> Volume:
        """Read and decode the pixels (each call reads the files again and keeps nothing);
        raises :class:`InputError` naming the file on failure."""
        try:
            return self.loader()
        except InputError:
            raise
        except Exception as exc:
            from ._dicom_decode import errors_for

            raise errors_for(exc, self.name) from exc


@dataclass
class ScanResult:
    candidates: list[Candidate]
    errors: list[InputError]
    skipped: list[tuple[str, str]]  # (file, reason) for valid non-image objects


def scan(
    inputs: Iterable[InputItem],
    pseudonymizer: Pseudonymizer,
    *,
    modality: str | None = None,
    limits: Limits | None = None,
    refs: InputRefs | None = None,
) -> ScanResult:
    """Find every volume in ``inputs``.

    ``modality`` labels non-DICOM volumes (NIfTI, NRRD carry none), so the right
    intensity recipe applies to them, and ``refs`` name their patient and study (DICOM
    volumes keep the names of their own headers). ``limits`` bound what the inputs
    together may declare and inflate to, at scan and when the candidates are loaded
    (defaults: :class:`Limits`).
    """
    errors: list[InputError] = []
    skipped: list[tuple[str, str]] = []
    frames: list[Frame] = []
    candidates: list[Candidate] = []
    claimed: set[str] = set()  # data files of detached headers: not inputs of their own
    for item in expand_within(inputs, Budget(limits)):
        if isinstance(item, InputError):
            errors.append(item)
            continue
        try:
            kind = sniff(item)
            if kind == "dicom":
                from ._dicom_read import Skipped, read_frames

                try:
                    frames.extend(read_frames(item, pseudonymizer))  # digested, header parsed
                except Skipped as note:
                    skipped.append((item.name, str(note)))
            elif kind in ("nifti", "itk"):
                vf = (open_nifti if kind == "nifti" else open_itk)(item, modality)
                claimed.update(vf.data_files)
                names = _file_names(vf.key, pseudonymizer, refs or InputRefs())
                files: frozenset[str] = (
                    frozenset()
                )  # a re-sent NIfTI is recognised by its digest (named
                if kind == "nifti" and vf.n_volumes == 1 and not refs:  # by its bytes alone)
                    with item.spooled() as f:
                        files = frozenset({pseudonymizer.file_digest(f)})
                for t in range(vf.n_volumes):
                    candidates.append(
                        Candidate(
                            name=item.name,
                            source_format=kind,
                            n_slices=vf.n_slices,
                            study=names[0],
                            series=names[1],
                            part=f"t={t}" if vf.n_volumes > 1 else "",
                            loader=functools.partial(_named, vf.load, t, names),
                            files=files,
                        )
                    )
        except InputError as exc:
            errors.append(exc)
    for series in assemble(frames):
        candidates.append(_dicom_candidate(series, pseudonymizer))
    errors = [e for e in errors if not (isinstance(e, NotDicomError) and e.path in claimed)]
    if errors:  # counted by code: a file's name may name the patient
        codes = Counter(e.code for e in errors)
        log.info(
            "%d input(s) rejected: %s", len(errors), ", ".join(f"{n} {c}" for c, n in codes.items())
        )
    return ScanResult(candidates=candidates, errors=errors, skipped=skipped)


def _file_names(key: str, pseudo: Pseudonymizer, refs: InputRefs) -> tuple[str, str, str | None]:
    """The (study, series, patient) names of a non-DICOM file's volumes: series by the keyed
    pseudonym of the file's hash ``key``, study by the sender's (pseudonymised) reference or
    else the series' name (the file is its own study), patient by the sender's or none."""
    series = pseudo.keyed_name("series", f"file:{key}")  # never a UID's: UIDs are digits, dots
    return refs.study or series, series, refs.patient


def _named(load: Callable[[int], Volume], t: int, names: tuple[str, str, str | None]) -> Volume:
    """Time point ``t`` of a non-DICOM file, under its pseudonymous ``names``."""
    volume = load(t)
    study, series, patient = names
    meta = dataclasses.replace(volume.meta, study=study, series=series, patient=patient)
    return dataclasses.replace(volume, meta=meta)


def dicom_among(inputs: Iterable[InputItem], limits: Limits | None = None) -> str | None:
    """The name of the first DICOM file in ``inputs`` (zips opened), or None: a sender's
    patient and study references name non-DICOM volumes only. Only each file's first
    bytes are read; unreadable inputs are left to :func:`scan` to report."""
    for item in expand(inputs, limits=limits):
        if isinstance(item, InputError):
            continue
        try:
            if sniff(item) == "dicom":
                return item.name
        except InputError:
            continue
    return None


def _dicom_candidate(series: DicomSeries, pseudo: Pseudonymizer) -> Candidate:
    from ._dicom_volume import to_volume

    f0 = series.frames[0]
    return Candidate(
        name=series.name,
        source_format="dicom",
        n_slices=series.n_slices,
        study=pseudo.name("study", f0.study_uid),
        series=pseudo.name("series", f0.series_uid),
        part=series.part,
        loader=functools.partial(to_volume, series, pseudo),
        files=frozenset(f.digest for f in series.frames),
        resent=series.resent,
    )


def load_volumes(
    inputs: Iterable[InputItem],
    pseudonymizer: Pseudonymizer,
    *,
    modality: str | None = None,
    limits: Limits | None = None,
    refs: InputRefs | None = None,
) -> tuple[list[Volume], list[InputError]]:
    """Scan and decode everything at once (convenient for small inputs and tests)."""
    result = scan(inputs, pseudonymizer, modality=modality, limits=limits, refs=refs)
    volumes: list[Volume] = []
    errors = list(result.errors)
    for cand in result.candidates:
        try:
            volumes.append(cand.load())
        except InputError as exc:
            errors.append(exc)
    return volumes, errors


__getattr__, __dir__ = lazy_names(__name__, _WHERE, __all__)
