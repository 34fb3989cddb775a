"""The service's part of ``radcache check``: the entry catalog and the job database
compared with the store. :func:`check` adds them to what
:func:`radcache.embeddings.consistency.check` compares (the store, its tables and its
search indexes); each is one :class:`~radcache.embeddings.consistency.Part`.

The kinds:

* ``catalog-missing`` — a live entry the catalog does not list.
* ``catalog-stale`` — a catalog row of an entry that is gone, or that is not what its
  entry's metadata says (the study could still be listed after its deletion).
* ``dangling-alias`` — a catalog reference naming an entry by a study, series or part it
  no longer has, or naming no catalogued entry.
* ``job-entry-orphan`` — the job database's note of which job stored an entry that is
  gone (it keeps the deleted study's name).
* ``job-stuck`` — a job left ``running`` by a worker that died.
* ``job-upload-missing`` — an unfinished job whose upload is gone: it can never run.
* ``orphan-upload`` — an upload folder that no unfinished job names: a submission cut off
  before it was acknowledged, or the upload of a job that finished.

A repair rebuilds the catalog from the store (:meth:`EntryCatalog.rebuild`), forgets the
orphan notes (:meth:`EntryCatalog.forget`), requeues stuck jobs (``dead`` once they have
started as often as the queue allows a delivery that keeps dying), fails the jobs whose
upload is lost (:func:`~.runner.fail_job`), and disposes of orphan uploads as a finished
job's are (:func:`~.runner.dispose_upload`; one without a job was never acknowledged and is
deleted). What a catalog sync does anyway (rows appended or tombstoned since the catalog
last followed a table) is not a finding. ``job-stuck`` and ``orphan-upload`` are only
looked for as the store's sole writer: a running server's jobs and uploads look the same.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Set
from pathlib import Path
from typing import Any

from sqlalchemy import select

from radcache.embeddings import EmbeddingStore
from radcache.embeddings.consistency import (
    CheckReport,
    Finding,
    IndexPart,
    Part,
    Repair,
)
from radcache.embeddings.consistency import check as check_store
from radcache.embeddings.store.integrity import StoreState, finding

from .catalog_tables import CatalogEntry, CatalogRef, CatalogSpace, entry_rows
from .dicom.hold import HOLD_DIR
from .entry_catalog import Cursor, EntryCatalog
from .jobs import FINISHED, EntryRow, JobRow, JobStore
from .runner import dispose_upload, fail_job

__all__ = ["KINDS", "CatalogPart", "JobsPart", "check"]

#: What each kind of finding about the catalog and the jobs means.
KINDS = {
    "catalog-missing": "live entry the entry catalog does not list",
    "catalog-stale": "catalog row of a gone entry, or not what the entry's metadata says",
    "dangling-alias": "catalog reference to a study, series or part its entry no longer has",
    "job-entry-orphan": "job database note of the job that stored an entry that is gone",
    "job-stuck": "job left running by a worker that died",
    "job-upload-missing": "unfinished job whose upload is gone",
    "orphan-upload": "upload folder no unfinished job names",
}
_CATALOG = ("catalog-missing", "catalog-stale", "dangling-alias")
Ref = tuple[str, str, str, str]  # study, series, part, tenant


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class CatalogPart:
    """The entry catalog and the job database's entry notes, against the live entries."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs

    def _compare(self, store: EmbeddingStore, state: StoreState) -> dict[str, list[str]]:
        """The keys of each kind (every one, not the twenty a finding lists)."""
        with self.jobs.session() as s:
            rows = {r.key: r for r in s.scalars(select(CatalogEntry))}
            refs: dict[str, set[Ref]] = {}
            for r in s.scalars(select(CatalogRef)):
                refs.setdefault(r.key, set()).add((r.study, r.series, r.part, r.tenant))
            cursors = {
                c.space: Cursor(c.table_id, c.generation, c.rows, c.deleted)
                for c in s.scalars(select(CatalogSpace))
            }
            notes = set(s.scalars(select(EntryRow.key)))
        truth = {k: a for space in state.live for k, a in state.indexed(space).items()}
        pending = _pending(store, state, cursors, {k: r.space for k, r in rows.items()})
        out: dict[str, list[str]] = {kind: [] for kind in (*_CATALOG, "job-entry-orphan")}
        for key, attrs in sorted(truth.items()):
            if key in pending:
                continue
            row, want = entry_rows(key, attrs)
            expected = {(r["study"], r["series"], r["part"], r["tenant"]) for r in want}
            if key not in rows:
                out["catalog-missing"].append(key)
                continue
            have = rows[key]
            if any(_canon(getattr(have, f)) != _canon(v) for f, v in row.items()) or (
                expected - refs.get(key, set())
            ):
                out["catalog-stale"].append(key)
            out["dangling-alias"] += [key] * len(refs.get(key, set()) - expected)
        for key in sorted(rows):
            if key not in truth and key not in pending:
                out["catalog-stale"].append(key)
        for key in sorted(refs):
            if key not in rows and key not in pending:  # a reference to no entry row
                out["dangling-alias"] += [key] * len(refs[key])
        out["job-entry-orphan"] = sorted(k for k in notes if k not in truth and k not in pending)
        return out

    def inspect(self, store: EmbeddingStore, state: StoreState) -> list[Finding]:
        return _findings(
            state,
            self._compare(store, state),
            "catalog: compared while other processes may write; an entry whose job is "
            "finishing at that moment can show as catalog-stale or dangling-alias: "
            "check again to confirm",
        )

    def repair(
        self, store: EmbeddingStore, state: StoreState, found: list[Finding]
    ) -> list[Repair]:
        catalog = EntryCatalog(self.jobs)
        catalog.sync(store)  # what a start would follow anyway
        done: list[Repair] = []
        if any(f.kind in _CATALOG for f in found):
            n = catalog.rebuild(store)
            done += [
                Repair(f.kind, f.count, f"catalog rebuilt from the store ({n} entries)")
                for f in found
                if f.kind in _CATALOG
            ]
        orphans = self._compare(store, state)["job-entry-orphan"]
        if orphans:
            catalog.forget(orphans)
            done.append(Repair("job-entry-orphan", len(orphans), "forgotten"))
        return done


def _findings(
    state: StoreState, found: Mapping[str, list[str]], unsure: str, counted: Set[str] = frozenset()
) -> list[Finding]:
    """The findings of ``found`` (kind → keys), the ``counted`` kinds without their keys;
    ``unsure`` says what may be off, unless this process is the store's sole writer."""
    if not state.sole:
        state.skipped.append(unsure)
    return [
        finding(KINDS, kind, [] if kind in counted else keys, count=len(keys))
        for kind, keys in found.items()
        if keys
    ]


def _pending(
    store: EmbeddingStore,
    state: StoreState,
    cursors: Mapping[str, Cursor],
    catalogued: Mapping[str, str],
) -> set[str]:
    """The keys the next catalog sync records or forgets anyway (the catalog is merely
    behind the tables there)."""
    out: set[str] = set()
    for space, meta in state.tables.items():
        cur = cursors.get(space)
        now = Cursor.of(meta)
        if cur == now:
            continue
        live = state.live.get(space, {})
        dead: list[str] | None = None
        if cur is not None and (cur.table_id, cur.generation) == (now.table_id, now.generation):
            dead = store.tombstoned(space, cur.deleted, now.deleted, generation=now.generation)
        if cur is None or dead is None:  # reconciled by key: the differences by key
            known = {k for k, s in catalogued.items() if s == space}
            out |= (set(live) - known) | (known - set(live))
            continue
        out |= {k for k, row in live.items() if row >= cur.rows} | set(dead)
    return out


class JobsPart:
    """The job database's unfinished jobs and the upload folder, against each other."""

    def __init__(
        self,
        jobs: JobStore,
        upload_dir: Path | None = None,
        *,
        quarantine: Path | None = None,
        max_starts: int = 5,
    ) -> None:
        """``max_starts``: starts after which a stuck job is ``dead`` rather than requeued
        (the scale-out queue's rule for deliveries that keep dying: retries + 2)."""
        self.jobs = jobs
        self.upload_dir = upload_dir
        self.quarantine = quarantine
        self.max_starts = max_starts

    def _compare(self, state: StoreState) -> dict[str, list[str]]:
        with self.jobs.session() as s:
            q = select(JobRow).where(JobRow.state.in_(("queued", "running")))
            unfinished = list(s.scalars(q.order_by(JobRow.created)))
        out: dict[str, list[str]] = {"job-stuck": [], "job-upload-missing": [], "orphan-upload": []}
        if state.sole:
            out["job-stuck"] = [r.id for r in unfinished if r.state == "running"]
        for r in unfinished:
            if r.upload and not Path(r.upload).exists():
                row = self.jobs.get(r.id)  # finished (and its upload dropped) meanwhile?
                if row is not None and row.state not in FINISHED:
                    out["job-upload-missing"].append(r.id)
        if state.sole and self.upload_dir is not None and self.upload_dir.is_dir():
            named = {Path(r.upload).name for r in unfinished if r.upload}
            kept = self.quarantine.resolve() if self.quarantine is not None else None
            out["orphan-upload"] = sorted(
                d.name
                for d in self.upload_dir.iterdir()
                if d.name not in named
                and d.resolve() != kept  # quarantine may live here
                and d.name != HOLD_DIR  # instances the DICOM receiver acknowledged
            )
        return out

    def inspect(self, store: EmbeddingStore, state: StoreState) -> list[Finding]:
        return _findings(
            state,
            self._compare(state),
            "job-stuck, orphan-upload: only as the store's sole writer (a running server's "
            "jobs and uploads in progress look the same)",
            counted={"orphan-upload"},  # upload folders: named by the server, but file names
        )

    def repair(
        self, store: EmbeddingStore, state: StoreState, found: list[Finding]
    ) -> list[Repair]:
        todo = self._compare(state)
        done: list[Repair] = []
        requeued = dead = 0
        for job_id in todo["job-stuck"]:
            row = self.jobs.get(job_id)
            if row is None or row.state != "running":
                continue
            if (row.attempts or 0) >= self.max_starts:
                fail_job(
                    self.jobs,
                    job_id,
                    "dead",
                    f"its worker died on each of {row.attempts} starts",
                    self.quarantine,
                )
                dead += 1
            else:
                self.jobs.update(job_id, state="queued", worker=None)
                requeued += 1
        if todo["job-stuck"]:
            done.append(Repair("job-stuck", requeued, "requeued"))
            if dead:
                done.append(Repair("job-stuck", dead, "marked dead"))
        for job_id in todo["job-upload-missing"]:
            fail_job(
                self.jobs,
                job_id,
                "failed",
                "its upload was lost before it ran (the server stopped); submit the study again",
            )
        if todo["job-upload-missing"]:
            done.append(Repair("job-upload-missing", len(todo["job-upload-missing"]), "failed"))
        if todo["orphan-upload"] and self.upload_dir is not None:
            for name in todo["orphan-upload"]:
                self._dispose(self.upload_dir / name)
            done.append(Repair("orphan-upload", len(todo["orphan-upload"]), "disposed of"))
        return done

    def _dispose(self, upload: Path) -> None:
        """Drop an upload no unfinished job names: as its finished job's end asks, or
        (no job: never acknowledged) at once."""
        with self.jobs.session() as s:
            job = s.scalars(select(JobRow).where(JobRow.upload == str(upload)).limit(1)).first()
        if job is not None and job.state in FINISHED:
            dispose_upload(upload, job.id, job.state, self.quarantine)
        elif upload.is_dir() and not upload.is_symlink():
            shutil.rmtree(upload, ignore_errors=True)
        else:
            upload.unlink(missing_ok=True)


def check(
    store: EmbeddingStore,
    jobs: JobStore | None,
    *,
    repair: bool = False,
    upload_dir: Path | None = None,
    quarantine: Path | None = None,
    max_starts: int = 5,
    index_dir: Path | None = None,
    index_options: Mapping[str, Any] | None = None,
) -> CheckReport:
    """Whether the store, its tables, its saved indexes, the entry catalog and the job
    database agree (``jobs`` None: the store and the indexes alone); with ``repair``, fix
    what they do not and look again (see
    :func:`radcache.embeddings.consistency.check` for running beside a server)."""
    parts: list[Part] = [IndexPart(index_dir, **(index_options or {}))]
    if jobs is not None:
        parts += [
            CatalogPart(jobs),
            JobsPart(jobs, upload_dir, quarantine=quarantine, max_starts=max_starts),
        ]
    return check_store(store, repair=repair, parts=parts)
