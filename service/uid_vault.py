"""The UID vault (opt-in): each stored series' original Study, Series and SOP Instance UIDs
(and its Patient ID, so that a PACS files the document under the right patient), encrypted
at rest, so that similar cases can be named to a PACS in a Key Object Selection
document (:func:`kos_document`) while the store and the index hold pseudonyms only.

The key comes from the settings (``RADCACHE_UID_VAULT_KEY``, like the pseudonym secret)
and is never stored beside the data; without it the vault is off and nothing is kept.
Rows (table ``uid_vault``, migration ``0007``) are keyed by (tenant, study pseudonym, entry)
and sealed with AES-256-GCM (``cryptography``); the associated data binds each ciphertext
to its row, so a ciphertext moved to another tenant, study or entry fails to open. The
rows of a study leave with it (:func:`.erasure.delete_study`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import LargeBinary, String, delete
from sqlalchemy.orm import Mapped, mapped_column

from radcache.embeddings.errors import ConfigError, NotFoundError
from radcache.embeddings.pseudonyms import Pseudonymizer

from .jobs import Base, JobStore

__all__ = [
    "OriginalUids",
    "UidVault",
    "VaultRow",
    "kos_document",
    "read_originals",
]

_NONCE = 12  # bytes: AES-GCM's standard nonce, random per seal
_INFO = b"radcache uid vault v1"
_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "PatientID")


class VaultRow(Base):
    __tablename__ = "uid_vault"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    study: Mapped[str] = mapped_column(String(128), primary_key=True)
    entry: Mapped[str] = mapped_column(String(32), primary_key=True)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)  # nonce ‖ ciphertext ‖ tag


@dataclass
class OriginalUids:
    """The original UIDs of one series: its study, itself and its instances
    (SOP Class UID, SOP Instance UID), and the original Patient ID ("" when unknown)."""

    study: str
    series: str
    instances: list[tuple[str, str]] = field(default_factory=list)
    patient_id: str = ""

    def to_json(self) -> bytes:
        return json.dumps([self.study, self.series, self.instances, self.patient_id]).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> OriginalUids:
        study, series, instances, *patient = json.loads(raw)  # rows sealed before: no ID
        return cls(study, series, [(str(c), str(i)) for c, i in instances], *patient)


def read_originals(upload: Path, pseudo: Pseudonymizer) -> dict[tuple[str, str], OriginalUids]:
    """The original UIDs of the DICOM files under ``upload`` (headers only), by the
    (study, series) pseudonyms ingest gives them. Files that are not DICOM are passed over."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = [upload] if upload.is_file() else sorted(p for p in upload.rglob("*") if p.is_file())
    out: dict[tuple[str, str], OriginalUids] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_TAGS))
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        study, series = str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", ""))
        sop, cls = str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", ""))
        if not (study and series and sop and cls):
            continue
        names = (pseudo.name("study", study), pseudo.name("series", series))
        uids = out.setdefault(names, OriginalUids(study, series, [], str(ds.get("PatientID", ""))))
        if (cls, sop) not in uids.instances:
            uids.instances.append((cls, sop))
    return out


class UidVault:
    """Seals, opens and forgets original UIDs in the job database."""

    def __init__(self, jobs: JobStore, secret: bytes) -> None:
        if len(secret) < 16:
            raise ConfigError(
                f"the UID vault key has {len(secret)} bytes; expected at least 16 "
                "(RADCACHE_UID_VAULT_KEY, e.g. `openssl rand -hex 32`)."
            )
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(secret)
        self._aead = AESGCM(key)
        self.jobs = jobs

    def __repr__(self) -> str:  # never print the key
        return "UidVault()"

    @staticmethod
    def _bound(tenant: str, study: str, entry: str) -> bytes:
        return f"{_INFO.decode()}\0{tenant}\0{study}\0{entry}".encode()

    def keep(
        self,
        tenant: str,
        series: Iterable[Mapping[str, Any]],
        originals: Mapping[tuple[str, str], OriginalUids],
    ) -> int:
        """Seal the originals of the stored ``series`` (a job report's items: study,
        series, entry); replaces earlier rows of the same entry. Returns how many rows."""
        rows = []
        for s in series:
            uids = originals.get((s["study"], s["series"]))
            if uids is None:  # not DICOM (NIfTI has no UIDs to keep)
                continue
            nonce = os.urandom(_NONCE)
            bound = self._bound(tenant, s["study"], s["entry"])
            sealed = nonce + self._aead.encrypt(nonce, uids.to_json(), bound)
            rows.append(VaultRow(tenant=tenant, study=s["study"], entry=s["entry"], sealed=sealed))
        with self.jobs._session() as sess:
            for row in rows:
                sess.merge(row)
        return len(rows)

    def originals(self, tenant: str, study: str, entry: str) -> OriginalUids:
        """The originals of ``entry`` as ``study`` delivered it; :class:`NotFoundError`
        when the vault holds none (stored before the vault was on, or not DICOM)."""
        with self.jobs._session() as sess:
            row = sess.get(VaultRow, (tenant, study, entry))
        if row is None:
            raise NotFoundError(
                f"the UID vault holds no original UIDs of entry {entry} in study {study}; "
                "expected a DICOM series stored while the vault was on. Send the study "
                "again to keep them."
            )
        nonce, body = row.sealed[:_NONCE], row.sealed[_NONCE:]
        try:
            raw = self._aead.decrypt(nonce, body, self._bound(tenant, study, entry))
        except InvalidTag:
            raise ConfigError(
                f"the UID vault row of entry {entry} does not open with the configured key; "
                "expected the RADCACHE_UID_VAULT_KEY it was sealed with."
            ) from None
        return OriginalUids.from_json(raw)

    def forget(self, tenant: str, study: str, entries: Iterable[str] | None = None) -> int:
        """Delete the rows of ``tenant``'s ``study`` (only those of ``entries`` when given);
        returns how many."""
        stmt = delete(VaultRow).where(VaultRow.tenant == tenant, VaultRow.study == study)
        if entries is not None:
            stmt = stmt.where(VaultRow.entry.in_(sorted(set(entries))))
        with self.jobs._session() as sess:
            return int(getattr(sess.execute(stmt), "rowcount", 0) or 0)

    def kos(self, tenant: str, query: tuple[str, str], hits: Iterable[tuple[str, str]]) -> bytes:
        """A KOS in the study of ``query`` (study, entry) referencing ``hits`` (study, entry
        pairs, best first) by their original UIDs."""
        similar = [self.originals(tenant, study, entry) for study, entry in hits]
        return kos_document(self.originals(tenant, *query), similar, "similar cases (radcache)")


def kos_document(query: OriginalUids, similar: list[OriginalUids], description: str) -> bytes:
    """A Key Object Selection document (highdicom) in ``query``'s study, under its original
    Patient ID (no other patient attribute), that references every instance of the
    ``similar`` series, as Part 10 bytes."""
    from io import BytesIO

    import highdicom as hd
    from pydicom import Dataset
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    def ref(study: str, series: str, cls: str, sop: str) -> Dataset:
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPClassUID, ds.SOPInstanceUID = cls, sop
        ds.PatientID, ds.PatientName = query.patient_id, ""
        ds.PatientBirthDate, ds.PatientSex = "", ""
        ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "", "", "", ""
        ds.ReferringPhysicianName = ""
        ds.Rows = ds.Columns = 0  # marks an image: referenced as IMAGE content items
        return ds

    refs = [ref(query.study, s.series, c, i) for s in similar for c, i in s.instances]
    if not refs:
        raise NotFoundError("no similar series with original UIDs to reference; expected ≥ 1.")
    own = ref(query.study, query.series, *query.instances[0])
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest, referenced_objects=refs, description=description
    )
    # highdicom builds single-study evidence only: build it so, then name each series' study.
    doc = hd.ko.KeyObjectSelectionDocument(
        evidence=[own, *refs],
        content=content,
        series_instance_uid=generate_uid(),
        series_number=1,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="radcache",
    )
    doc.CurrentRequestedProcedureEvidenceSequence = _evidence(similar)
    buf = BytesIO()
    doc.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _evidence(series: list[OriginalUids]) -> list[Any]:
    """The Hierarchical SOP Instance Reference items of ``series``, one per study."""
    from pydicom import Dataset

    studies: dict[str, Dataset] = {}
    for s in series:
        study = studies.get(s.study)
        if study is None:
            study = studies[s.study] = Dataset()
            study.StudyInstanceUID, study.ReferencedSeriesSequence = s.study, []
        item = Dataset()
        item.SeriesInstanceUID, item.ReferencedSOPSequence = s.series, []
        for cls, sop in s.instances:
            inst = Dataset()
            inst.ReferencedSOPClassUID, inst.ReferencedSOPInstanceUID = cls, sop
            item.ReferencedSOPSequence.append(inst)
        study.ReferencedSeriesSequence.append(item)
    return list(studies.values())
