"""The job database's migrations (SQLite here; PostgreSQL in test_scaleout) and dynamic
batching across concurrent callers."""

from __future__ import annotations

import threading
from pathlib import Path

import sqlalchemy as sa
import torch

from radcache.embeddings.batching import BatchingEncoder
from radcache.embeddings.encode import Encoder
from radcache.service.jobs import JobStore


def test_a_database_from_before_migrations_is_upgraded_in_place(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as c:  # the schema radcache made before it had migrations
        c.execute(sa.text(
            "CREATE TABLE jobs (id VARCHAR(32) PRIMARY KEY, state VARCHAR(20), "
            "upload VARCHAR(1024), created DATETIME, started DATETIME, finished DATETIME, "
            "slices_done INTEGER, slices_total INTEGER, report JSON, failure VARCHAR(2000), "
            "options JSON)"
        ))  # fmt: skip
        c.execute(sa.text(
            "INSERT INTO jobs VALUES ('a1', 'done', '/u', '2026-11-01 00:00:00', NULL, NULL, "
            "3, 3, NULL, NULL, '{}')"
        ))  # fmt: skip
    engine.dispose()
    jobs = JobStore(url)
    old = jobs.get("a1")
    assert old is not None and old.state == "done" and old.attempts == 0
    row = jobs.create("/u2")
    started = jobs.start(row.id, "host:1")
    assert started is not None and started.attempts == 1 and started.worker == "host:1"
    jobs.finish(row.id, "done", None)
    assert jobs.start(row.id) is None  # a finished job is not started again
    series = [{"entry": "e" * 32, "study": "s", "series": "x", "part": ""}]
    assert jobs.record_entries(row.id, series, lambda k: "space") == 1
    assert jobs.record_entries("another", series, lambda k: "space") == 0  # one row per key
    jobs.close()
    with sa.create_engine(url).connect() as c:
        assert c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0007"
    JobStore(url).close()  # opening again changes nothing


def test_concurrent_callers_share_forwards_and_get_their_own_rows(tiny_fp32: Encoder) -> None:
    batcher = BatchingEncoder(tiny_fp32, max_batch=32)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(n, 3, 112, 112, generator=gen) for n in (5, 7, 3, 9, 6, 2, 8, 4)]
    expected = [tiny_fp32.forward(x, last_n=2) for x in inputs]
    got: dict[int, tuple[torch.Tensor, ...]] = {}
    start = threading.Barrier(len(inputs))

    def call(i: int) -> None:
        start.wait()
        for _ in range(3):
            got[i] = batcher.forward(inputs[i], last_n=2)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    before = tiny_fp32.forward_count
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert batcher.merged > 0  # some forwards served several callers
    assert tiny_fp32.forward_count - before < 3 * len(inputs)
    for i, exp in enumerate(expected):
        for a, b in zip(got[i], exp, strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
