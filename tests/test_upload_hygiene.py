"""Uploads live only as long as their job, and what names the client's files leaves in time.

Real jobs through the real runner, worker and queue middleware (tiny random model, SQLite
job database): whatever state a job ends in, its upload is deleted, or moved to the
quarantine directory when it did not end done; finished jobs and quarantined uploads are
purged after the retention period; the client's file names reach the job's report (its
tenant only) and never the logs.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dramatiq import Message
from dramatiq.broker import MessageProxy
from pydantic import ValidationError

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer, open_index
from radcache.embeddings.encode import Encoder
from radcache.embeddings.errors import QueueFullError
from radcache.service.entry_catalog import EntryCatalog
from radcache.service.jobs import JobState, JobStore
from radcache.service.queue import ACTOR, QUEUE, _Attempt, _job_states
from radcache.service.runner import fail_job, purge_quarantine, run_job
from radcache.service.settings import ServiceSettings
from radcache.service.worker import IndexKeeper, Worker
from tests.conftest import TEST_SECRET
from tests.dicomgen import phantom, write_series

NAME = "DOE_JOHN"  # a client file name that names the patient
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def pipeline(tiny: Encoder, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    store = EmbeddingStore(tmp_path_factory.mktemp("hygiene") / "s.zarr")
    return Pipeline(tiny, store, Pseudonymizer(TEST_SECRET.encode()), batch_size=8)


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[JobStore]:
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield store
    store.close()


_SEEDS = iter(range(400, 10_000))


def _upload(root: Path, kind: str) -> Path:
    """An upload as the service saves one: ``good`` (a series), ``mixed`` (a series and a
    file that is no image), ``bad`` (only that file)."""
    upload = root / "uploads" / f"u{next(_SEEDS)}"
    upload.mkdir(parents=True)
    if kind in ("good", "mixed"):
        gen = write_series(root / "src" / upload.name, phantom(3, 16, 16, seed=next(_SEEDS)))
        for i, f in enumerate(gen.files):
            shutil.copy(f, upload / f"{i:05d}-slice{i}.dcm")
    if kind in ("mixed", "bad"):
        (upload / f"00099-{NAME}.txt").write_bytes(b"notes, not an image")
    return upload


def _quarantine(tmp_path: Path, on: bool) -> Path | None:
    return tmp_path / "quarantine" if on else None


def _check_disposed(upload: Path, quarantine: Path | None, job_id: str, state: str) -> None:
    assert not upload.exists()
    kept = quarantine / job_id if quarantine is not None else None
    if kept is not None and state != "done":
        assert sorted(p.name for p in kept.iterdir()) == sorted(
            p.name for p in (upload.parent.parent / "expect" / upload.name).iterdir()
        )
        assert time.time() - kept.stat().st_mtime < 60  # its retention counts from now
    elif kept is not None:
        assert not kept.exists()


def _remember(upload: Path) -> None:
    """A copy of what the upload held, to compare the quarantined one with."""
    shutil.copytree(upload, upload.parent.parent / "expect" / upload.name)


@pytest.mark.parametrize("quarantined", [False, True])
@pytest.mark.parametrize(
    ("kind", "state"), [("good", "done"), ("mixed", "partially_failed"), ("bad", "failed")]
)
def test_a_job_that_ends_drops_its_upload(
    pipeline: Pipeline, jobs: JobStore, tmp_path: Path, kind: str, state: str, quarantined: bool
) -> None:
    quarantine = _quarantine(tmp_path, quarantined)
    upload = _upload(tmp_path, kind)
    _remember(upload)
    row = jobs.create(str(upload))
    run_job(pipeline, jobs, row.id, quarantine=quarantine)
    done = jobs.get(row.id)
    assert done is not None and done.state == state
    _check_disposed(upload, quarantine, row.id, state)


@pytest.mark.parametrize("quarantined", [False, True])
def test_a_job_that_raises_drops_its_upload(
    pipeline: Pipeline,
    jobs: JobStore,
    tmp_path: Path,
    quarantined: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    quarantine = _quarantine(tmp_path, quarantined)
    upload = _upload(tmp_path, "good")
    _remember(upload)
    row = jobs.create(str(upload), options={"recipe": {"slice_axis": "diagonal"}})
    with pytest.raises(ValidationError):  # what the worker meets
        run_job(pipeline, jobs, row.id)
    assert upload.exists()  # run_job alone decides nothing about a job that raised
    caplog.set_level(logging.DEBUG, logger="radcache")
    Worker(pipeline, jobs, limit=4, quarantine=quarantine).process(row.id)
    failed = jobs.get(row.id)
    assert failed is not None and failed.state == "failed"
    assert failed.failure is not None and failed.failure.startswith("ValidationError")
    _check_disposed(upload, quarantine, row.id, "failed")
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 1 and row.id in logged[0].getMessage()


def _delivered(job_id: str, retries: int, *, failed: bool) -> MessageProxy:
    message = MessageProxy(
        Message(
            queue_name=QUEUE,
            actor_name=ACTOR,
            args=(job_id,),
            kwargs={},
            options={"retries": retries},
        )
    )
    if failed:
        message.fail()
    return message


@pytest.mark.parametrize("quarantined", [False, True])
def test_a_dead_job_drops_its_upload_a_retried_one_keeps_it(
    jobs: JobStore, tmp_path: Path, quarantined: bool
) -> None:
    """Scale-out: the queue's middleware sees each failed delivery; the upload stays while
    the job will be tried again and goes when the queue gives up on it."""
    quarantine = _quarantine(tmp_path, quarantined)
    upload = _upload(tmp_path, "good")
    _remember(upload)
    row = jobs.create(str(upload))
    states = _job_states(jobs, quarantine)
    boom = RuntimeError(f"cannot open {upload}/00001-{NAME}.dcm")
    states.after_process_message(None, _delivered(row.id, 1, failed=False), exception=boom)
    retried = jobs.get(row.id)
    assert retried is not None and retried.state == "queued" and upload.exists()
    assert retried.failure is not None and retried.failure.startswith("delivery 1 failed")
    attempt = _Attempt(row.id, boom)  # what the worker raises: Dramatiq logs this
    assert NAME not in str(attempt) and str(upload) not in str(attempt)
    states.after_process_message(None, _delivered(row.id, 3, failed=True), exception=attempt)
    dead = jobs.get(row.id)
    assert dead is not None and dead.state == "dead"
    # the failure names the client's file for its tenant, never the server's path
    assert dead.failure == f"gave up after 3 deliveries: RuntimeError: cannot open 00001-{NAME}.dcm"
    _check_disposed(upload, quarantine, row.id, "dead")


def test_a_job_that_cannot_be_queued_drops_its_upload(
    pipeline: Pipeline, jobs: JobStore, tmp_path: Path
) -> None:
    worker = Worker(pipeline, jobs, limit=1)
    worker.queue.put("someone-else")
    upload = _upload(tmp_path, "good")
    row = jobs.create(str(upload))
    with pytest.raises(QueueFullError):
        worker.submit(row.id)
    failed = jobs.get(row.id)
    assert failed is not None and failed.state == "failed"
    assert failed.failure is not None and failed.failure.startswith("could not be queued")
    assert not upload.exists()


def test_file_names_reach_the_report_of_the_tenant_never_the_logs(
    pipeline: Pipeline, jobs: JobStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    upload = _upload(tmp_path, "mixed")
    row = jobs.create(str(upload), tenant="clinic-a")
    run_job(pipeline, jobs, row.id)
    mine = jobs.get(row.id, tenant="clinic-a")
    assert mine is not None and mine.report is not None
    assert [e["path"] for e in mine.report["errors"]] == [f"00099-{NAME}.txt"]
    assert str(upload) not in str(mine.report)  # names as uploaded, not server paths
    assert jobs.get(row.id, tenant="clinic-b") is None
    assert row.id not in {j.id for j in jobs.recent(tenant="clinic-b")}
    assert "1 input(s) rejected: 1 not-dicom" in caplog.text  # what is logged: counts
    assert NAME not in caplog.text and str(upload) not in caplog.text


def _aged(jobs: JobStore, state: JobState, days: float, tenant: str = "t") -> str:
    row = jobs.create(f"/nowhere/{state}", tenant=tenant)
    if state in ("queued", "running"):
        jobs.update(row.id, state=state, created=dt.datetime.now(dt.UTC) - days * DAY)
    else:
        jobs.finish(row.id, state, {"errors": [{"path": f"{NAME}.dcm"}]})
        jobs.update(row.id, finished=dt.datetime.now(dt.UTC) - days * DAY)
    return row.id


def test_purge_deletes_jobs_finished_before_the_retention_period(jobs: JobStore) -> None:
    old = [_aged(jobs, s, 8) for s in ("done", "partially_failed", "failed", "dead")]
    recent = [_aged(jobs, s, 6.5) for s in ("done", "dead")]
    waiting = [_aged(jobs, s, 30) for s in ("queued", "running")]  # never purged
    series = [{"entry": "e" * 32, "study": "st", "series": "se", "part": ""}]
    assert jobs.record_entries(old[0], series, lambda key: "space") == 1
    assert jobs.purge(7 * DAY) == 4
    assert [jobs.get(i) for i in old] == [None] * 4
    assert all(jobs.get(i) is not None for i in recent + waiting)
    assert jobs.entry_count() == 1  # what the purged job stored stays noted
    assert jobs.purge(7 * DAY) == 0
    assert jobs.purge(6 * DAY) == 2


def test_purge_quarantine_deletes_what_is_past_the_retention_period(tmp_path: Path) -> None:
    quarantine = tmp_path / "q"
    assert purge_quarantine(quarantine, DAY) == 0  # none yet
    for name, days in (("old", 2.0), ("new", 0.5)):
        (quarantine / name).mkdir(parents=True)
        (quarantine / name / f"00000-{NAME}.dcm").write_bytes(b"x")
        when = time.time() - days * 86400
        os.utime(quarantine / name, (when, when))
    assert purge_quarantine(quarantine, DAY) == 1
    assert [p.name for p in quarantine.iterdir()] == ["new"]


def test_the_index_keeper_purges_on_its_own(
    pipeline: Pipeline, jobs: JobStore, tmp_path: Path
) -> None:
    quarantine = tmp_path / "q"
    upload = _upload(tmp_path, "bad")
    row = jobs.create(str(upload))
    fail_job(jobs, row.id, "failed", "it broke", quarantine)
    assert (quarantine / row.id).is_dir()
    old = _aged(jobs, "failed", 3)
    week = dt.datetime.now(dt.UTC) - 3 * DAY
    os.utime(quarantine / row.id, (week.timestamp(), week.timestamp()))
    keeper = IndexKeeper(
        open_index(pipeline.store, tmp_path / "idx"),
        3600,
        catalog=EntryCatalog(jobs),
        retention=2 * 86400,
        quarantine=quarantine,
        purge_every=3600,
    )
    keeper.start()  # the first purge runs at once
    try:
        for _ in range(200):
            if jobs.get(old) is None and not (quarantine / row.id).exists():
                break
            time.sleep(0.02)
    finally:
        keeper.stop()
    assert jobs.get(old) is None and not (quarantine / row.id).exists()
    assert jobs.get(row.id) is not None  # it finished just now: its report stays a while
    assert keeper.purge() == (0, 0)


def test_retention_and_quarantine_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = ServiceSettings(job_retention_days=0.5, quarantine_dir=Path("q"))
    assert s.quarantine_dir == tmp_path.resolve() / "q" and s.job_retention_days == 0.5
    assert ServiceSettings().quarantine_dir is None and ServiceSettings().job_retention_days == 7
    with pytest.raises(ValidationError):
        ServiceSettings(job_retention_days=0)
