"""Where the DICOM receiver keeps instances, on disk, from the moment each is acknowledged
until its study's job has them; and when a study is complete.

The hold is a folder of the upload directory (:data:`HOLD_DIR`, on the same file system
as the uploads, so instances move and link into a job's upload without a copy)::

    .incoming/<random>.dcm                        an instance being checked (not acknowledged)
    <tenant>/<study>/pending/<series>/<inst>.dcm  acknowledged; the study still arriving
    <tenant>/<study>/batch-<random>/<series>/…    a complete batch, being handed to the intake
    <tenant>/<study>/kept/<series>/…              handed over; held for late instances

``<study>`` and ``<series>`` are the names the API shows (pseudonyms unless UIDs are
kept); an instance's file is named by the keyed pseudonym of its SOP Instance UID, so an
instance sent twice is held once. A study is complete ``dicom_idle_s`` after its last
instance (or when the association that sent it ends, with ``dicom_on_release``): its
pending instances become a batch, and the batch one upload for
:func:`~radcache.service.intake.accept`, series by series, each with the instances of that
series still kept from earlier batches. So an instance that comes after its study was
handed over makes a job of its series alone, with all of the series' instances: the
series is embedded again, whole, and the study's other series are left as they are.

Everything is on disk: a restart hands over what was pending or being handed over (an
aborted association loses nothing it was told was stored), and drops what was being
checked (never acknowledged). Kept series go ``dicom_keep_s`` after their last hand-over,
and with their study when it is deleted (:func:`forget_study`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from radcache.clients.schemas import SubmitOptions
from radcache.embeddings.errors import PayloadTooLargeError
from radcache.embeddings.ingest import InstanceIds
from radcache.embeddings.pseudonyms import Pseudonymizer

from ..deps import Resources
from ..intake import accept, new_upload
from ..options import job_options
from ..settings import ServiceSettings
from ..uploads import MAX_FILES

__all__ = ["HOLD_DIR", "Hold", "forget_study", "hold_root"]

log = logging.getLogger(__name__)

#: The hold's folder in the upload directory (``radcache check`` leaves it alone).
HOLD_DIR = "dicom-hold"
_INCOMING = ".incoming"  # not a tenant name: those start with a letter or digit
_EXPIRE_EVERY_S = 10.0
_SAFE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")


def hold_root(settings: ServiceSettings) -> Path:
    """The hold's folder."""
    return settings.upload_dir / HOLD_DIR


def forget_study(settings: ServiceSettings, tenant: str, study: str) -> None:
    """Drop every instance the hold has of ``tenant``'s ``study`` (its API name): pending,
    being handed over or kept (a consent deletion)."""
    if _SAFE.fullmatch(study):
        shutil.rmtree(hold_root(settings) / tenant / study, ignore_errors=True)


def _folder(names: Pseudonymizer, kind: Literal["study", "series"], uid: str) -> str:
    """The folder of a study or series: its API name (a pseudonym, or the UID where UIDs
    are kept), or its keyed pseudonym where a kept UID is no safe folder name."""
    name = names.name(kind, uid)
    return name if _SAFE.fullmatch(name) else names.keyed_name(kind, uid)


def _place(src: Path, dst: Path) -> None:
    """A second name for ``src`` at ``dst`` (a hard link; a copy where links fail)."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


@dataclass
class _Study:
    """A study whose instances are arriving."""

    tenant: str
    name: str
    files: int = 0
    bytes: int = 0
    last: float = field(default_factory=time.monotonic)
    senders: set[int] = field(default_factory=set)  # open associations that sent to it
    complete: bool = False  # its last sender ended (dicom_on_release)


class Hold:
    """The instances the receiver acknowledged, and the thread that hands complete
    studies to the intake. Thread-safe: every association's thread calls :meth:`admit`."""

    def __init__(self, res: Resources) -> None:
        self.res = res
        s = res.settings
        self.root = hold_root(s)
        self.idle, self.keep, self.on_release = s.dicom_idle_s, s.dicom_keep_s, s.dicom_on_release
        self._lock = threading.Lock()
        self._studies: dict[tuple[str, str], _Study] = {}
        self._batches: list[tuple[float, Path]] = []  # (not before, batch folder)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="radcache-dicom-hold", daemon=True)

    # --- the associations' side ---

    def incoming(self) -> Path:
        """The folder arriving instances are written to, before they are checked."""
        return self.root / _INCOMING

    def admit(self, path: Path, tenant: str, ids: InstanceIds, sender: int) -> None:
        """Hold the checked instance at ``path`` (``ids`` from its header) for ``tenant``;
        raises :class:`PayloadTooLargeError` past the upload limits (the study's bytes and
        files) and :class:`QueueFullError` when a new study could not be queued. The file
        is moved, not copied; on a refusal it stays where it was."""
        names = self.res.pipeline.pseudonymizer.for_tenant(tenant)
        study_name, series_name = (
            _folder(names, "study", ids.study),
            _folder(names, "series", ids.series),
        )
        # a SOP Instance UID is never a series UID: the keyed names cannot clash
        file_name = names.keyed_name("series", ids.sop_instance) + ".dcm"
        size = path.stat().st_size
        key = (tenant, study_name)
        if key not in self._studies:
            self.res.worker.check_capacity()  # a new study will be a new job
        limit = self.res.settings.max_upload_bytes
        with self._lock:
            held = self._studies.get(key) or _Study(tenant, study_name)
            if held.files >= MAX_FILES or held.bytes + size > limit:
                raise PayloadTooLargeError(
                    f"the study's instances would pass the upload limits ({MAX_FILES} files, "
                    f"{limit} bytes); send it in parts after the first is embedded, or raise "
                    "RADCACHE_MAX_UPLOAD_BYTES."
                )
            folder = self.root / tenant / study_name / "pending" / series_name
            folder.mkdir(parents=True, exist_ok=True)
            dst = folder / file_name
            if dst.exists():  # the same instance again: the newer copy counts
                held.bytes -= dst.stat().st_size
                held.files -= 1
            os.replace(path, dst)
            held.files += 1
            held.bytes += size
            held.last = time.monotonic()
            held.senders.add(sender)
            self._studies[key] = held

    def ended(self, sender: int, *, released: bool) -> None:
        """An association ended: with ``dicom_on_release``, the studies it was the last
        sender of are complete when it was released (an aborted one waits for idle)."""
        with self._lock:
            for held in self._studies.values():
                if sender in held.senders:
                    held.senders.discard(sender)
                    if released and self.on_release and not held.senders:
                        held.complete = True
                        self._wake.set()

    # --- the hand-over thread ---

    def start(self) -> None:
        """Take up what a previous run left, then start handing studies over."""
        shutil.rmtree(self.root / _INCOMING, ignore_errors=True)  # never acknowledged
        for folder in self._study_folders():
            for batch in folder.glob("batch-*"):
                self._batches.append((0.0, batch))
            pending = folder / "pending"
            if pending.is_dir():
                files = [f for f in pending.rglob("*.dcm") if f.is_file()]
                held = _Study(folder.parent.name, folder.name, len(files))
                held.bytes = sum(f.stat().st_size for f in files)
                self._studies[(held.tenant, held.name)] = held
        if self._studies or self._batches:
            log.info(
                "DICOM hold: %d studies pending, %d batches to hand over from before",
                len(self._studies),
                len(self._batches),
            )
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the hand-over thread runs."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop handing over (what is pending stays on disk for the next start)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        tick = min(0.25, self.idle / 4)
        expired = 0.0
        while not self._stop.is_set():
            self._wake.wait(tick)
            self._wake.clear()
            try:
                expired = self._pass(expired)
            except Exception as exc:  # a file system error: the next pass tries again
                log.error("DICOM hold pass failed: %s", type(exc).__name__)

    def _pass(self, expired: float) -> float:
        """Hand over what is complete or due again; expire kept series now and then.
        Returns when kept series were last expired."""
        self._batches += [(0.0, batch) for batch in self._complete()]
        now = time.monotonic()
        due = [b for at, b in self._batches if at <= now]
        self._batches = [(at, b) for at, b in self._batches if at > now]
        for batch in due:
            if self._stop.is_set() or not self._hand_over(batch):
                self._batches.append((time.monotonic() + max(self.idle, 5.0), batch))
        if now - expired >= _EXPIRE_EVERY_S:
            expired = now
            self._expire()
        return expired

    def _complete(self) -> list[Path]:
        """Pending studies now complete, each renamed to a batch (under the lock: an
        instance arriving after this starts a new pending folder)."""
        now, out = time.monotonic(), []
        with self._lock:
            for key, held in list(self._studies.items()):
                if not held.complete and now - held.last < self.idle:
                    continue
                del self._studies[key]
                pending = self.root / held.tenant / held.name / "pending"
                batch = pending.with_name(f"batch-{uuid.uuid4().hex}")
                try:
                    pending.rename(batch)
                except FileNotFoundError:  # deleted with its study meanwhile
                    continue
                out.append(batch)
        return out

    def _hand_over(self, batch: Path) -> bool:
        """One upload of the batch's series (with their kept instances) to the intake;
        False to try again later."""
        study = batch.parent
        tenant = study.parent.name
        if not batch.is_dir():
            return True  # deleted with its study
        try:
            options = job_options(SubmitOptions(), self.res.encoder.cfg, tenant)
            upload = new_upload(self.res, "dicom-")
            files, series, again = self._gather(batch, study / "kept", upload)
            if again:  # their entries from earlier hand-overs are replaced
                options = options.model_copy(update={"supersede": again})
            taken = accept(self.res, upload, options)  # owns the upload from here
        except Exception as exc:  # the queue full, the job database away: try again
            log.warning(
                "DICOM study of tenant %s not handed over yet: %s", tenant, type(exc).__name__
            )
            return False
        log.info(
            "DICOM study of tenant %s complete: %d instances in %d series, job %s%s",
            tenant,
            files,
            series,
            taken.job.id,
            " (cached)" if taken.cached else "",
        )
        self._keep(batch, study / "kept")
        return True

    @staticmethod
    def _gather(batch: Path, kept: Path, upload: Path) -> tuple[int, int, list[str]]:
        """Link the batch's instances, and the kept ones of its series it does not
        replace, into ``upload``; returns (instances, series, the series that had kept
        instances: embedded again whole)."""
        files = series = 0
        again: list[str] = []
        try:
            for part in sorted(p for p in batch.iterdir() if p.is_dir()):
                dst = upload / part.name
                dst.mkdir()
                series += 1
                if (kept / part.name).is_dir():
                    again.append(part.name)
                for src in (kept / part.name, part):  # the batch's copy of an instance wins
                    if src.is_dir():
                        for f in src.iterdir():
                            _place(f, dst / f.name)
                files += sum(1 for _ in dst.iterdir())
        except BaseException:
            shutil.rmtree(upload, ignore_errors=True)
            raise
        return files, series, again

    def _keep(self, batch: Path, kept: Path) -> None:
        """Move the handed-over batch into the kept series (or drop it: ``dicom_keep_s``
        0); the kept folder's time is when its study was last handed over."""
        if self.keep > 0:
            for part in (p for p in batch.iterdir() if p.is_dir()):
                dst = kept / part.name
                dst.mkdir(parents=True, exist_ok=True)
                for f in part.iterdir():
                    os.replace(f, dst / f.name)
            if kept.is_dir():
                os.utime(kept)
        shutil.rmtree(batch, ignore_errors=True)

    def _study_folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [
            study
            for tenant in self.root.iterdir()
            if tenant.is_dir() and tenant.name != _INCOMING
            for study in tenant.iterdir()
            if study.is_dir()
        ]

    def _expire(self) -> None:
        """Drop kept series past ``dicom_keep_s``, and folders left empty."""
        cutoff = time.time() - self.keep
        for study in self._study_folders():
            kept = study / "kept"
            try:
                if kept.is_dir() and kept.stat().st_mtime < cutoff:
                    shutil.rmtree(kept, ignore_errors=True)
                with self._lock:  # admit makes folders under the lock
                    if not any(study.iterdir()):
                        study.rmdir()
                    if not any(study.parent.iterdir()):
                        study.parent.rmdir()
            except OSError:  # made or removed meanwhile
                continue
