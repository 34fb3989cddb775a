"""Scale-out against the real servers: `radcache serve --queue` enqueues on Redis, `radcache
worker` processes run the jobs, PostgreSQL holds the jobs. Workers are killed, the API is
restarted, a failing job lands in the dead-letter state — and nothing is lost or stored
twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer, open_store
from radcache.embeddings.encode import Encoder
from tests.dicomgen import phantom, write_series
from tests.servers import free_port, running_server, start, wait_ready
from tests.test_service import zip_bytes

PG = "postgresql+psycopg://postgres@127.0.0.1:5432"
REDIS = "redis://127.0.0.1:6379/0"


def _reachable() -> str | None:
    """Why the servers cannot be used, or None."""
    import redis
    import sqlalchemy as sa

    try:
        redis.Redis.from_url(REDIS, socket_timeout=2).ping()
    except Exception as exc:
        return f"Redis at {REDIS} does not answer ({exc})"
    engine = sa.create_engine(f"{PG}/postgres")
    try:
        with engine.connect():
            pass
    except Exception as exc:
        return f"PostgreSQL at {PG} does not answer ({exc})"
    finally:
        engine.dispose()
    return None


@pytest.fixture(scope="module", autouse=True)
def _servers() -> None:
    why = _reachable()
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"scale-out tests need Redis and PostgreSQL under CI: {why}")
        pytest.skip(f"scale-out tests skipped: {why}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A fresh PostgreSQL database and Redis namespace; env for every process."""
    import redis
    import sqlalchemy as sa

    name = f"radcache_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    env = {
        "RADCACHE_QUEUE": REDIS,
        "RADCACHE_QUEUE_NAMESPACE": f"rc-{name}",
        "RADCACHE_QUEUE_VISIBILITY_S": "3",
        "RADCACHE_QUEUE_BACKOFF_S": "0.2",
        "RADCACHE_QUEUE_MAX_RETRIES": "1",
        "RADCACHE_DB": f"{PG}/{name}",
        "RADCACHE_PRECISION": "fp32",
        "RADCACHE_UPLOAD_DIR": str(tmp_path / "uploads"),
        "RADCACHE_WORKER_GRACE_S": "5",
    }
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield {"root": tmp_path, "env": env, "db": f"{PG}/{name}", "procs": procs}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        client = redis.Redis.from_url(REDIS)
        keys = list(client.scan_iter(f"rc-{name}*"))
        if keys:
            client.delete(*keys)
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def worker(c: dict[str, Any], name: str, **env: str) -> subprocess.Popen[bytes]:
    p = start(c["root"], "worker", "--threads", "2", log=f"{name}.log", **c["env"], **env)
    c["procs"].append(p)
    return p


def studies(root: Path, n: int, seed: int, slices: int = 4) -> list[Path]:
    return [
        write_series(root / f"st{seed}-{i}", phantom(slices, 16, 16, seed=seed + i)).directory
        for i in range(n)
    ]


def post(http: httpx.Client, directory: Path) -> str:
    r = http.post(
        "/v1/studies", content=zip_bytes(directory), headers={"content-type": "application/zip"}
    )
    assert r.status_code == 202, r.text
    return str(r.headers["location"])


FINISHED = ("done", "partially_failed", "failed", "dead")


def job_metrics(http: httpx.Client) -> tuple[float, float, float]:
    """(series embedded, slices embedded, jobs finished) in a replica's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    got = {"radcache_series_total": 0.0, "radcache_slices_total": 0.0}
    jobs = 0.0
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name in got and sample.labels.get("cache") == "miss":
                got[sample.name] += sample.value
            elif sample.name == "radcache_job_seconds_count":
                jobs += sample.value
    return got["radcache_series_total"], got["radcache_slices_total"], jobs


def wait(http: httpx.Client, location: str, *, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(location).json()
        if job["state"] in FINISHED:
            return dict(job)
        time.sleep(0.1)
    raise AssertionError(f"{location} still {job['state']} after {timeout} s")


def wait_progress(http: httpx.Client, location: str, slices: int) -> dict[str, Any]:
    """The job once at least ``slices`` slices are embedded (a worker is mid-study)."""
    deadline = time.monotonic() + 120
    while (job := http.get(location).json())["progress"]["done"] < slices:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return dict(job)


def stored_once(store_path: Path) -> list[str]:
    """Entry keys of the store's table; asserts none is there twice and nothing is staged."""
    store = open_store(store_path)
    (space,) = store.spaces()
    keys = list(store.table(space).keys)
    assert len(keys) == len(set(keys)), "an entry is in the table twice"
    staging = store_path / "staging"
    left = [p.name for p in staging.iterdir() if p.is_dir()] if staging.exists() else []
    assert not left, f"half-written entries remain: {left[:10]}"
    return keys


def test_two_workers_and_two_api_replicas_embed_thirty_studies_from_three_clients(
    cluster: dict[str, Any], tiny_fp32: Encoder, pseudo: Pseudonymizer
) -> None:
    root = cluster["root"]
    worker(cluster, "w1")
    worker(cluster, "w2")
    dirs = studies(root, 30, seed=1000)
    db_url, env = cluster["db"], cluster["env"]
    with (  # two API replicas on one database, queue and store
        running_server(root, db=db_url, log="api1.log", **env) as (url1, _),
        running_server(root, db=db_url, log="api2.log", **env) as (url2, _),
        httpx.Client(base_url=url1, timeout=60) as api1,
        httpx.Client(base_url=url2, timeout=60) as api2,
    ):
        apis = [api1, api2, api1]
        with ThreadPoolExecutor(3) as clients:  # three clients, ten studies each
            locations = list(clients.map(lambda i: post(apis[i % 3], dirs[i]), range(30)))
        jobs = [wait(api2 if i % 3 == 1 else api1, loc) for i, loc in enumerate(locations)]
        listed = api2.get("/v1/jobs", params={"limit": 100}).json()
        # Both replicas see every new entry in their search index within the refresh period.
        deadline = time.monotonic() + 10
        for api in (api1, api2):
            # A replica lists no index until its first refresh has seen an entry.
            while (n := sum(i["entries"] for i in api.get("/v1/indexes").json())) < 30:
                assert time.monotonic() < deadline, n
                time.sleep(0.2)
        # Each replica's /metrics counts the jobs it accepted, once workers finished them
        # (api1 took 20, api2 10): summed over replicas, every job once.
        expected = [(20.0, 80.0, 20.0), (10.0, 40.0, 10.0)]
        while (counted := [job_metrics(api) for api in (api1, api2)]) != expected:
            assert time.monotonic() < deadline, counted
            time.sleep(0.2)
    assert [j["state"] for j in jobs] == ["done"] * 30, [j["failure"] for j in jobs]
    entries = [j["series"][0]["entry"] for j in jobs]
    assert len(set(entries)) == 30
    assert sorted(stored_once(root / "s.zarr")) == sorted(entries)
    assert len(listed) == 30  # jobs accepted by either replica, listed by one
    from radcache.service.jobs import JobStore

    db = JobStore(cluster["db"])
    assert db.entry_count() == 30
    workers = {db.get(loc.rsplit("/", 1)[1]).worker for loc in locations}  # type: ignore[union-attr]
    db.close()
    assert len(workers) == 2, workers  # both worker processes took jobs
    # The same studies through one process give the same embeddings under the same keys.
    local = Pipeline(tiny_fp32, EmbeddingStore(root / "local.zarr"), pseudo)
    served = open_store(root / "s.zarr")
    for d in dirs[:10]:
        (res,) = local.embed([d]).series
        assert res.entry in entries
        np.testing.assert_allclose(
            served.read(res.entry, "cls"), local.store.read(res.entry, "cls"), atol=1e-5
        )


def test_a_killed_worker_s_study_is_finished_by_another(cluster: dict[str, Any]) -> None:
    root = cluster["root"]
    (big,) = [write_series(root / "big", phantom(240, 64, 64, seed=5)).directory]
    # One slice per forward: slow enough to be killed in the middle of the study.
    w1 = worker(cluster, "w1", RADCACHE_BATCH_SIZE="1")
    with (
        running_server(root, db=cluster["db"], **cluster["env"]) as (url, _),
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        loc = post(http, big)
        job = wait_progress(http, loc, 20)
        assert job["state"] == "running" and job["progress"]["done"] < 240
        w1.send_signal(signal.SIGKILL)
        w1.wait(timeout=30)
        worker(cluster, "w2")  # picks the study up once w1's visibility timeout passes
        job = wait(http, loc)
    assert job["state"] == "done", job
    (key,) = stored_once(root / "s.zarr")
    assert key == job["series"][0]["entry"]
    assert open_store(root / "s.zarr").read(key, "cls").shape[0] == 240
    from radcache.service.jobs import JobStore

    db = JobStore(cluster["db"])
    row = db.get(loc.rsplit("/", 1)[1])
    db.close()
    assert row is not None and row.attempts == 2


def test_an_api_restart_loses_no_accepted_job(cluster: dict[str, Any]) -> None:
    root = cluster["root"]
    dirs = studies(root, 10, seed=2000)
    port = free_port()
    env = cluster["env"]
    with (
        running_server(root, db=cluster["db"], port=port, **env) as (url, _),
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        locations = [post(http, d) for d in dirs]  # accepted; no worker runs yet
    # The API is gone (stopped by the context); the jobs wait in Redis and PostgreSQL.
    worker(cluster, "w1")
    api = start(root, "serve", "--port", str(port), "--db", cluster["db"], log="api2.log", **env)
    cluster["procs"].append(api)
    wait_ready(url, api, root / "api2.log")
    with httpx.Client(base_url=url, timeout=60) as http:
        jobs = [wait(http, loc) for loc in locations]
    assert [j["state"] for j in jobs] == ["done"] * 10
    assert len(stored_once(root / "s.zarr")) == 10


def test_a_job_that_keeps_failing_is_dead_lettered_and_listed(cluster: dict[str, Any]) -> None:
    from radcache.service.jobs import JobStore
    from radcache.service.queue import RedisQueue
    from radcache.service.settings import ServiceSettings

    root = cluster["root"]
    worker(cluster, "w1")
    settings = ServiceSettings(
        **{k.removeprefix("RADCACHE_").lower(): v for k, v in cluster["env"].items()}
    )
    jobs = JobStore(cluster["db"])
    # A job whose stored recipe is invalid raises in the worker on every delivery.
    row = jobs.create(str(root / "nothing"), options={"recipe": {"slice_axis": "diagonal"}})
    queue = RedisQueue(settings, jobs)
    queue.submit(row.id)
    queue.stop()
    with (
        running_server(root, db=cluster["db"], **cluster["env"]) as (url, _),
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        job = wait(http, f"/v1/jobs/{row.id}", timeout=60)
        listed = {j["id"]: j["state"] for j in http.get("/v1/jobs").json()}
    jobs.close()
    assert job["state"] == "dead" and "gave up after 2 deliveries" in job["failure"], job
    assert listed[row.id] == "dead"
    # one structured line per retry and per dead letter, nothing identifying
    lines = [ln for ln in (root / "w1.log").read_text().splitlines() if f"job={row.id}" in ln]
    events = [ln.split("job_event=", 1)[1].split()[0] for ln in lines if "job_event=" in ln]
    assert events == ["retry", "dead"], lines
    assert "delivery=1" in lines[-2] and "deliveries=2" in lines[-1] and "diagonal" not in lines[-1]


def test_a_replica_counts_each_job_it_queued_once(cluster: dict[str, Any]) -> None:
    """The API side of the queue hands a job's report to ``on_done`` (the metrics) once,
    when a worker has finished it; jobs that ended without a report count no series."""
    from radcache.service.jobs import JobStore
    from radcache.service.queue import RedisQueue
    from radcache.service.settings import ServiceSettings

    settings = ServiceSettings(
        **{k.removeprefix("RADCACHE_").lower(): v for k, v in cluster["env"].items()}
    )
    jobs = JobStore(cluster["db"])
    seen: list[tuple[float, list[dict[str, Any]]]] = []
    queue = RedisQueue(settings, jobs, on_done=lambda s, series: seen.append((s, series)))
    done, dead, later = (jobs.create(str(cluster["root"] / n)) for n in ("a", "b", "c"))
    for row in (done, dead, later):
        queue.submit(row.id)
    series = [{"entry": "e" * 32, "study": "s", "series": "x", "cache": "miss", "slices": 4}]
    jobs.start(done.id, "w1")
    jobs.finish(done.id, "done", {"series": series, "errors": [], "skipped": []})
    jobs.finish(dead.id, "dead", None, failure="gave up")
    assert queue.collect() == 2 and [s for _, s in seen] == [series] and seen[0][0] >= 0
    assert queue.collect() == 0 and len(seen) == 1  # never counted twice
    jobs.start(later.id, "w2")
    jobs.finish(later.id, "failed", {"series": [], "errors": [], "skipped": []})
    assert queue.collect() == 1 and [s for _, s in seen] == [series, []]
    queue.stop()
    jobs.close()


def test_sigterm_lets_the_running_job_finish(cluster: dict[str, Any]) -> None:
    root = cluster["root"]
    study = write_series(root / "mid", phantom(60, 64, 64, seed=9)).directory
    w1 = worker(cluster, "w1", RADCACHE_BATCH_SIZE="1")
    with (
        running_server(root, db=cluster["db"], **cluster["env"]) as (url, _),
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        loc = post(http, study)
        wait_progress(http, loc, 5)
        w1.send_signal(signal.SIGTERM)
        assert w1.wait(timeout=60) == 0
        job = http.get(loc).json()
    assert job["state"] == "done", job  # finished by the worker that was asked to stop
    assert (root / "w1.log").read_text().count("Traceback") == 0


@pytest.fixture
def s3(cluster: dict[str, Any]) -> Iterator[str]:
    """moto's standalone server — an S3 emulator speaking the real S3 protocol over HTTP —
    and a fresh bucket; the AWS variables every process needs to reach it."""
    import boto3

    port = free_port()
    log = (cluster["root"] / "moto.log").open("w")
    moto = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    aws = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "radcache-test",
        "AWS_SECRET_ACCESS_KEY": "radcache-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        for _ in range(100):
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=endpoint, **_boto(aws)).create_bucket(Bucket="radcache")
        cluster["env"].update(aws)
        os.environ.update(aws)  # for this process's reads
        yield "s3://radcache/store"
    finally:
        for k in aws:
            os.environ.pop(k, None)
        moto.terminate()
        moto.wait(timeout=30)
        log.close()


def _boto(aws: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": aws["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": aws["AWS_SECRET_ACCESS_KEY"],
        "region_name": aws["AWS_DEFAULT_REGION"],
    }


def test_workers_share_a_store_on_s3(cluster: dict[str, Any], s3: str) -> None:
    root = cluster["root"]
    store = ["--store", s3]  # after start()'s local --store: the last one wins
    for name in ("w1", "w2"):
        p = start(root, "worker", "--threads", "2", *store, log=f"{name}.log", **cluster["env"])
        cluster["procs"].append(p)
    dirs = studies(root, 6, seed=3000)
    twins = [
        write_series(root / f"twin{i}", phantom(4, 16, 16, seed=3000)).directory for i in range(3)
    ]
    with (
        running_server(root, *store, db=cluster["db"], **cluster["env"]) as (url, _),
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        with ThreadPoolExecutor(3) as clients:  # the same content three more times, at once
            locations = list(clients.map(lambda d: post(http, d), [*dirs, *twins]))
        jobs = [wait(http, loc, timeout=240) for loc in locations]
    assert [j["state"] for j in jobs] == ["done"] * 9, [j["failure"] for j in jobs]
    entries = {j["series"][0]["entry"] for j in jobs}
    assert len(entries) == 6  # the twins are the first study's content
    remote = open_store(s3)
    (space,) = remote.spaces()
    keys = list(remote.table(space).keys)
    assert sorted(keys) == sorted(entries)  # each stored once, the table consistent
    for key in keys:
        info = remote.get(key)
        assert info is not None and remote.read(key, "cls").shape == (4, 64)
