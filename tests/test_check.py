"""`radcache check`: each disagreement a stopped process can leave between the store, its
tables, its indexes, the entry catalog and the job database is found, and `--repair` fixes
it; and a server SIGKILLed during ingest and deletion loses no acknowledged study."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from sqlalchemy import delete, insert

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer, open_index, open_store
from radcache.embeddings.consistency import CheckReport
from radcache.embeddings.encode import Encoder
from radcache.embeddings.errors import StoreBusyError
from radcache.embeddings.pseudonyms import DEFAULT_TENANT
from radcache.embeddings.store.backend import _owner
from radcache.embeddings.store.tables import create_columns
from radcache.service.check import check
from radcache.service.cli import main
from radcache.service.entry_catalog import CatalogEntry, CatalogRef, EntryCatalog
from radcache.service.jobs import EntryRow, JobStore
from tests.dicomgen import phantom, write_series, zip_bytes
from tests.servers import finished, free_port, start, wait_ready


@dataclass
class Deployment:
    """A filled store with its saved indexes and a job database with its catalog."""

    root: Path
    inputs: list[Path]

    @property
    def store(self) -> Path:
        return self.root / "s.zarr"

    @property
    def db(self) -> str:
        return f"sqlite:///{self.root / 'j.db'}"

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    def keys(self) -> list[str]:
        return sorted(d.name for d in (self.store / "entries").iterdir() if d.is_dir())

    def space(self) -> str:
        return next(d.name for d in (self.store / "tables").iterdir() if d.is_dir())

    @contextlib.contextmanager
    def jobs(self) -> Iterator[JobStore]:
        jobs = JobStore(self.db)
        try:
            yield jobs
        finally:
            jobs.close()

    @contextlib.contextmanager
    def writing(self) -> Iterator[EmbeddingStore]:
        """The store open for writing, let go of afterwards (so a repair may run)."""
        st = EmbeddingStore(self.store)
        try:
            yield st
        finally:
            st.backend.close()

    def check(self, *, repair: bool = False) -> CheckReport:
        st = open_store(self.store, mode="a" if repair else "r")
        try:
            with self.jobs() as jobs:
                return check(
                    st,
                    jobs,
                    repair=repair,
                    upload_dir=self.uploads,
                    quarantine=self.uploads / "quarantine",  # inside it: not an upload
                )
        finally:
            st.backend.close()


def _kinds(findings: list[Any]) -> dict[str, int]:
    return {f.kind: f.count for f in findings}


def _studies(n: int, root: Path) -> list[Path]:
    """``n`` small CT series (one study each), as folders of DICOM files."""
    return [
        write_series(root / f"in{i}", phantom(3, 16, 16, seed=40 + i)).directory for i in range(n)
    ]


@pytest.fixture(scope="module")
def template(
    tmp_path_factory: pytest.TempPathFactory, tiny_fp32: Encoder, pseudo: Pseudonymizer
) -> Deployment:
    """Three embedded series, their saved index and their catalog (copied by each test)."""
    root = tmp_path_factory.mktemp("check")
    d = Deployment(root / "d", _studies(4, root))
    d.uploads.mkdir(parents=True)
    with d.writing() as st:
        Pipeline(tiny_fp32, st, pseudo).embed(d.inputs[:3])
        open_index(st)
        with d.jobs() as jobs:
            assert EntryCatalog(jobs).rebuild(st) == 3
    return d


@pytest.fixture
def dep(template: Deployment, tmp_path: Path) -> Deployment:
    shutil.copytree(template.root, tmp_path / "d")
    return Deployment(tmp_path / "d", template.inputs)


def _repaired(d: Deployment, expected: dict[str, int]) -> tuple[CheckReport, CheckReport]:
    """Check finds exactly ``expected`` (kind: count); a repair fixes it all; a check then
    finds nothing. Returns what the check and the repair reported."""
    found = d.check()
    assert _kinds(found.findings) == expected, found.to_dict()
    assert not found.ok and not found.repairs
    fixed = d.check(repair=True)
    assert fixed.ok and fixed.repaired, fixed.to_dict()
    assert {r.kind for r in fixed.repairs} == set(expected)
    after = d.check()
    assert after.ok and not after.findings, after.to_dict()
    return found, fixed


def test_a_consistent_deployment_checks_clean(dep: Deployment) -> None:
    report = dep.check()
    assert report.ok and report.findings == [] and report.sole is True and not report.skipped
    assert dep.check(repair=True).repairs == []  # nothing to do, nothing done


def test_staging_of_a_dead_writer_is_swept(dep: Deployment) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _owner().rpartition("-")[0]
    key = dep.keys()[0]
    debris = dep.store / "staging" / f"{key}.{host}-{dead.pid}.{'ab' * 16}"
    (debris / "cls").mkdir(parents=True)
    (debris / "zarr.json").write_text("{}")
    live = dep.store / "staging" / f"{key}.{_owner()}.{'cd' * 16}"  # this process: alive
    live.mkdir()
    found, _ = _repaired(dep, {"orphan-staging": 1})
    assert found.findings[0].keys == (key,)
    assert not debris.exists() and live.exists()


def test_an_entry_whose_deletion_stopped_halfway_is_removed(dep: Deployment) -> None:
    """The entry folder lost some files (a deletion's rmtree cut short): reading it would
    give fill values. Its row, its index vectors and its catalog row are dropped too."""
    key = dep.keys()[1]
    shutil.rmtree(dep.store / "entries" / key / "cls" / "c")
    found = dep.check()
    assert found.findings[0].keys == (key,)
    _repaired(
        dep,
        {"damaged-entry": 1, "table-row-orphan": 1, "indexed-missing": 1, "catalog-stale": 1},
    )
    st = open_store(dep.store)
    assert st.get(key) is None and key not in st.table_rows(dep.space())
    idx = open_index(st)
    assert key not in idx.spaces[dep.space()].catalog.by_key
    with dep.jobs() as jobs:
        assert EntryCatalog(jobs).get(key) is None


def test_an_entry_committed_without_its_row_gets_it(
    dep: Deployment, tiny_fp32: Encoder, pseudo: Pseudonymizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped between the entry's rename into place and its table append."""

    def stopped(*args: object) -> int:
        raise RuntimeError("the process stopped here")

    monkeypatch.setattr("radcache.embeddings.store.embedding_store.append_row", stopped)
    with dep.writing() as st, contextlib.suppress(RuntimeError):
        Pipeline(tiny_fp32, st, pseudo).embed(dep.inputs[3:])
    monkeypatch.undo()
    (key,) = set(dep.keys()) - set(open_store(dep.store).table_rows(dep.space()))
    found, _ = _repaired(dep, {"table-row-missing": 1})
    assert found.findings[0].keys == (key,)
    st = open_store(dep.store)
    assert key in st.table_rows(dep.space())
    assert key in open_index(st).spaces[dep.space()].catalog.by_key


def test_rows_of_a_deletion_stopped_before_its_tombstones(
    dep: Deployment, tiny_fp32: Encoder, pseudo: Pseudonymizer
) -> None:
    """The entry folder went, its row did not: an orphan row, still searchable; the same
    content stored again then has two live rows."""
    gone, again = dep.keys()[:2]
    for key in (gone, again):
        shutil.rmtree(dep.store / "entries" / key)
    with dep.writing() as st:
        Pipeline(tiny_fp32, st, pseudo).embed(dep.inputs[:3])  # sent again
        assert st.get(again) is not None and st.get(gone) is not None  # both stored again
        shutil.rmtree(dep.store / "entries" / gone)
    _, fixed = _repaired(
        dep, {"table-row-orphan": 1, "table-row-duplicate": 2, "indexed-missing": 1}
    )
    assert _kinds(fixed.repairs)["table-row-duplicate"] == 2
    st = open_store(dep.store)
    meta = st.table_meta(dep.space())
    assert meta["count"] - meta["deleted"] == 2 and gone not in st.table_rows(dep.space())
    np.testing.assert_array_equal(
        st.table(dep.space(), rows=[st.table_rows(dep.space())[again]]).cls,
        st.read(again, "cls"),
    )


def test_rows_of_an_interrupted_compaction_are_removed(dep: Deployment) -> None:
    with dep.writing() as st:
        g = st.root[f"tables/{dep.space()}"]
        assert isinstance(g, zarr.Group)
        create_columns(g.create_group("c" + "0" * 16), 64, 3, 9)
    _repaired(dep, {"orphan-compaction": 1})
    assert not (dep.store / "tables" / dep.space() / ("c" + "0" * 16)).exists()
    assert open_store(dep.store).table(dep.space()).keys  # the live rows are untouched


def test_index_and_catalog_that_say_other_than_the_entries(dep: Deployment) -> None:
    """An alias recorded without the index or catalog hearing of it (stopped before the
    job finished); a saved index that cannot be read; catalog and job notes that name
    what is not there."""
    key, other = dep.keys()[:2]
    with dep.writing() as st:
        st.add_alias(key, {"study": "s-alias", "series": "r-alias", "part": ""})
    with dep.jobs() as jobs, jobs.session() as s:
        s.execute(delete(CatalogEntry).where(CatalogEntry.key == other))
        s.execute(delete(CatalogRef).where(CatalogRef.key == other))
        s.execute(
            insert(CatalogRef).values(
                study="s-gone", series="r", part="", key=key, tenant=DEFAULT_TENANT
            )
        )
        s.execute(
            insert(EntryRow).values(
                key="f" * 32,
                space=dep.space(),
                study="s-gone",
                series="r",
                job=None,
                created=dt.datetime.now(dt.UTC),
            )
        )
    _repaired(
        dep,
        {
            "index-stale": 1,
            "catalog-stale": 1,
            "catalog-missing": 1,
            "dangling-alias": 1,
            "job-entry-orphan": 1,
        },
    )
    with dep.jobs() as jobs:
        assert {e.key for e in EntryCatalog(jobs).study("s-alias")} == {key}
        assert EntryCatalog(jobs).study("s-gone") == []
    (dep.store / "indexes" / dep.space() / "CURRENT").write_text("v-nowhere")
    _repaired(dep, {"index-unreadable": 1})


def test_jobs_and_uploads_a_dead_server_left(dep: Deployment) -> None:
    with dep.jobs() as jobs:
        held = dep.uploads / "held"
        held.mkdir()
        stuck = jobs.create(str(held)).id
        jobs.start(stuck)
        lost = jobs.create(str(dep.uploads / "never-saved")).id
        done = jobs.create(str(dep.uploads / "finished"), state="done").id
    (dep.uploads / "finished").mkdir()  # a finished job's upload left behind
    (dep.uploads / "cut-off").mkdir()  # a submission cut off before its job was written
    (dep.uploads / "quarantine" / "a-failed-job").mkdir(parents=True)
    (dep.uploads / "cut-off" / "part").write_bytes(b"\0" * 10)
    found, _ = _repaired(dep, {"job-stuck": 1, "job-upload-missing": 1, "orphan-upload": 2})
    (orphans,) = [f for f in found.findings if f.kind == "orphan-upload"]
    assert orphans.keys == () and "cut-off" not in json.dumps(found.to_dict())  # counted only
    with dep.jobs() as jobs:
        assert jobs.get(stuck).state == "queued" and held.exists()  # runs again at start
        assert (
            jobs.get(lost).state == "failed" and "submit the study again" in jobs.get(lost).failure
        )
        assert jobs.get(done).state == "done"
    assert sorted(p.name for p in dep.uploads.iterdir()) == ["held", "quarantine"]
    assert (dep.uploads / "quarantine" / "a-failed-job").is_dir()


def test_a_repair_refuses_to_run_beside_another_writer(dep: Deployment) -> None:
    shutil.rmtree(dep.store / "entries" / dep.keys()[0])
    (dep.uploads / "someones").mkdir()
    with dep.writing():  # another process with the store open for writing (a server)
        with pytest.raises(StoreBusyError, match="open for writing"):
            dep.check(repair=True)
        report = dep.check()  # reporting runs, and leaves out what a live writer looks like
        assert report.sole is False and "orphan-upload" not in _kinds(report.findings)
        assert _kinds(report.findings)["table-row-orphan"] == 1
        assert any(s.startswith("job-stuck, orphan-upload") for s in report.skipped)
        result = CliRunner().invoke(
            main, ["check", "--store", str(dep.store), "--db", dep.db, "--repair"]
        )
        assert result.exit_code == 2 and "store-busy" in result.output
    assert dep.check(repair=True).ok  # once it has gone


def test_cli_exit_status_and_json(dep: Deployment) -> None:
    args = ["check", "--store", str(dep.store), "--db", dep.db, "--upload-dir", str(dep.uploads)]
    run = CliRunner().invoke
    ok = run(main, [*args, "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["ok"] is True
    shutil.rmtree(dep.store / "entries" / dep.keys()[0])
    bad = run(main, [*args, "--json"])
    assert bad.exit_code == 1
    body = json.loads(bad.output)
    assert {f["kind"] for f in body["remaining"]} == {
        "table-row-orphan",
        "indexed-missing",
        "catalog-stale",
    }
    text = run(main, args)
    assert text.exit_code == 1 and "--repair` fixes them" in text.output
    fixed = run(main, [*args, "--repair"])
    assert fixed.exit_code == 0 and "consistent after repair" in fixed.output, fixed.output
    assert run(main, args).exit_code == 0
    missing = run(main, ["check", "--store", str(dep.root / "nowhere"), "--json"])
    assert missing.exit_code == 2 and json.loads(missing.output)["errors"][0]["code"] == "not-found"
    nodb = run(main, ["check", "--store", str(dep.store), "--db", f"sqlite:///{dep.root / 'x.db'}"])
    assert nodb.exit_code == 0 and "job database (--db) does not exist" in nodb.output
    assert not (dep.root / "x.db").exists()


# -- a real server, SIGKILLed during ingest and deletion -------------------------------
CRASHES = 2  # server runs killed at a random moment (one more runs to the end): a start
# costs seconds, and the test stays under a minute
_ZIP = {"content-type": "application/zip"}


@dataclass
class Book:
    """What the client was told, as a client would keep it."""

    accepted: dict[str, int]  # job id → study number, for every POST answered 200/202
    done: dict[str, list[str]]  # study pseudonym → its entries, once its job read done
    deleted: set[str]  # studies whose DELETE was answered
    deleting: set[str]  # studies whose DELETE was sent and not answered
    kinds: set[str]  # what the checks after the kills found


def _submit(
    http: httpx.Client, body: bytes, i: int, book: Book, todo: list[int] | None = None
) -> None:
    """POST a study and wait for its job, noting what the answers acknowledged (and
    taking it off ``todo`` once acknowledged: sent again later, a study deleted meanwhile
    would rightly be back)."""
    r = http.post("/v1/studies", content=body, headers=_ZIP)
    assert r.status_code in (200, 202), r.text
    job = r.json()
    book.accepted[job["id"]] = i
    if todo is not None:
        todo.remove(i)
    job = finished(http, f"/v1/jobs/{job['id']}", 60)
    assert job["state"] == "done", job
    for s in job["series"]:
        book.done.setdefault(s["study"], []).append(s["entry"])


def _readable(http: httpx.Client, entry: str) -> None:
    r = http.get(f"/v1/series/{entry}/embeddings?kind=cls&format=npy")
    assert r.status_code == 200, (entry, r.text)
    cls = np.load(io.BytesIO(r.content))
    assert cls.shape == (3, 64) and np.isfinite(cls).all() and np.abs(cls).sum() > 0


def _verify(http: httpx.Client, book: Book) -> None:
    """Nothing acknowledged is lost, nothing deleted is back, nothing half-written shows."""
    for job_id in list(book.accepted):  # accepted before a kill: finishes after the restart
        job = finished(http, f"/v1/jobs/{job_id}", 60)
        assert job["state"] == "done", job
        for s in job["series"]:
            book.done.setdefault(s["study"], [])
            if s["entry"] not in book.done[s["study"]]:
                book.done[s["study"]].append(s["entry"])
    for study, entries in book.done.items():
        if study in book.deleted:
            assert http.get(f"/v1/studies/{study}").status_code == 404, study
        elif study not in book.deleting:
            r = http.get(f"/v1/studies/{study}")
            assert r.status_code == 200, (study, r.text)
            for entry in entries:
                _readable(http, entry)
    # whatever is listed is whole (a study whose POST the kill cut off before its answer
    # may be listed too, once its job has run)
    for study in http.get("/v1/studies?limit=1000").json():
        assert study["study"] not in book.deleted, study
        for e in study["series"]:
            _readable(http, e["entry"])


def _check_cli(root: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(
        main,
        [
            "check",
            "--store",
            str(root / "s.zarr"),
            "--db",
            f"sqlite:///{root / 'j.db'}",
            "--upload-dir",
            str(root / "radcache-uploads"),
            "--json",
            *extra,
        ],
    )
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.output)


def _crash(
    url: str,
    bodies: list[bytes],
    todo: list[int],
    book: Book,
    rng: random.Random,
    proc: subprocess.Popen[bytes],
) -> None:
    """Send studies and delete one, and SIGKILL the server at a random moment."""
    errors: list[BaseException] = []

    def ingest() -> None:
        try:
            with httpx.Client(base_url=url, timeout=30) as http:
                for i in list(todo):
                    _submit(http, bodies[i], i, book, todo)
        except httpx.TransportError:  # the kill
            pass
        except BaseException as exc:
            errors.append(exc)

    def delete(study: str, after: float) -> None:
        time.sleep(after)
        book.deleting.add(study)
        try:
            with httpx.Client(base_url=url, timeout=30) as http:
                r = http.delete(f"/v1/studies/{study}")
            assert r.status_code in (202, 204), r.text
            book.deleted.add(study)
            book.deleting.discard(study)
        except httpx.TransportError:  # the kill
            pass
        except BaseException as exc:
            errors.append(exc)

    alive = sorted(s for s in book.done if s not in book.deleted | book.deleting)
    threads = [threading.Thread(target=ingest)]
    if alive:
        threads.append(threading.Thread(target=delete, args=(rng.choice(alive), rng.uniform(0, 1))))
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0.2, 2.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    for t in threads:
        t.join(60)
    assert not errors, errors


def _finish(url: str, proc: subprocess.Popen[bytes]) -> None:
    """Let every job end, then stop the server as an operator would."""
    with httpx.Client(base_url=url, timeout=30) as http:
        end = time.monotonic() + 30
        while any(j["state"] in ("queued", "running") for j in http.get("/v1/jobs").json()):
            assert time.monotonic() < end, "jobs still unfinished"
            time.sleep(0.1)
    proc.terminate()
    proc.wait(30)


def test_sigkill_during_ingest_and_deletion_loses_no_acknowledged_study(tmp_path: Path) -> None:
    seed = int(os.environ.get("CHECK_CRASH_SEED") or time.time_ns() % 1_000_000)
    rng = random.Random(seed)
    bodies = [zip_bytes(d) for d in _studies(2 + 2 * CRASHES, tmp_path / "in")]
    todo = list(range(len(bodies)))
    book = Book({}, {}, set(), set(), set())
    env = {"RADCACHE_ERASE_AFTER_S": "0.2", "RADCACHE_INDEX_REFRESH_S": "0.5"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for run in range(CRASHES + 1):
            port = free_port()
            db = f"sqlite:///{tmp_path / 'j.db'}"
            proc = start(
                tmp_path, "serve", "--port", str(port), "--db", db, log="server.log", **env
            )
            procs.append(proc)
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc, tmp_path / "server.log")
            with httpx.Client(base_url=url, timeout=30) as http:
                _verify(http, book)
                if not [s for s in book.done if s not in book.deleted | book.deleting]:
                    _submit(http, bodies[todo[0]], todo[0], book)  # something to delete
                    todo.pop(0)
            if run == CRASHES:
                break
            _crash(url, bodies, todo, book, rng, proc)
            status, report = _check_cli(tmp_path)
            book.kinds |= {f["kind"] for f in report["findings"]}
            if status:
                status, report = _check_cli(tmp_path, "--repair")
                assert status == 0, (seed, report)
        _finish(url, proc)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
    status, report = _check_cli(tmp_path)
    assert status == 0 and not report["findings"], (seed, report)
    assert book.done, seed
    print(
        f"crash seed {seed}: {len(book.accepted)} studies accepted, {len(book.deleted)} "
        f"deletions answered, {len(book.deleting)} cut off; checks after the kills found "
        f"{sorted(book.kinds) or 'nothing'}"
    )
