"""The overlapped pipeline: the same arrays as one stage after another, really concurrent,
bounded; the stage clock it fills, shown by `radcache embed --profile`."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from radcache.embeddings import EmbeddingStore, EmbedReport, Pipeline, Pseudonymizer, open_store
from radcache.embeddings._overlap import Prefetch
from radcache.embeddings.encode import Encoder
from radcache.embeddings.ingest import Candidate
from radcache.embeddings.preprocess import Prepared
from tests.dicomgen import phantom, write_series


@pytest.fixture(scope="module")
def three_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("three")
    for k, (n, rows, cols) in enumerate([(7, 24, 20), (5, 20, 20), (6, 16, 24)]):
        write_series(root / f"s{k}", phantom(n, rows, cols, seed=k), shuffle=True)
    return root


def _embed(
    encoder: Encoder, store: Path, pseudo: Pseudonymizer, data: Path, overlap: bool
) -> tuple[Pipeline, EmbedReport]:
    pipe = Pipeline(encoder, EmbeddingStore(store), pseudo, batch_size=3, overlap=overlap)
    report = pipe.embed([data])
    assert report.ok and [r.cache for r in report.series] == ["miss"] * 3
    return pipe, report


def test_overlapped_output_is_the_sequential_output_bit_for_bit(
    tiny: Encoder, three_series: Path, tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    _, seq = _embed(tiny, tmp_path / "seq.zarr", pseudo, three_series, overlap=False)
    pipe, ovl = _embed(tiny, tmp_path / "ovl.zarr", pseudo, three_series, overlap=True)
    assert [r.entry for r in ovl.series] == [r.entry for r in seq.series]  # same order
    a, b = open_store(tmp_path / "seq.zarr"), open_store(tmp_path / "ovl.zarr")
    for r in seq.series:
        kinds = a.resolve(r.entry).kinds
        assert "cls_last" in kinds and any(k.startswith("patch") for k in kinds)
        assert b.resolve(r.entry).kinds == kinds
        for kind in kinds:  # the arrays as stored, whatever the patch storage
            x, y = (np.asarray(cast(Any, s.root)[f"entries/{r.entry}/{kind}"][...]) for s in (a, b))
            assert x.dtype == y.dtype and np.array_equal(x, y), kind
    seconds = pipe.profile.seconds()
    assert all(seconds[s] > 0 for s in ("decode", "preprocess", "forward", "write"))
    assert pipe.profile.slices == 18 and 0 < pipe.profile.busy_fraction() <= 1


def test_decode_and_preprocessing_run_while_the_model_runs(
    tiny: Encoder,
    three_series: Path,
    store_path: Path,
    pseudo: Pseudonymizer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Decode of the next series starts before the forward of the current one ends, and
    so does the preparation of the next batch (the forward is slowed to make room)."""
    events: list[tuple[str, float]] = []
    load, batch, forward = Candidate.load, Prepared.batch, tiny.forward

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any, **kw: Any) -> Any:
            events.append((f"{name}+", time.perf_counter()))
            try:
                return fn(*a, **kw)
            finally:
                events.append((f"{name}-", time.perf_counter()))

        return run

    def slow_forward(*a: Any, **kw: Any) -> Any:
        time.sleep(0.05)
        return forward(*a, **kw)

    monkeypatch.setattr(Candidate, "load", timed("load", load))
    monkeypatch.setattr(Prepared, "batch", timed("batch", batch))
    monkeypatch.setattr(tiny, "forward", timed("forward", slow_forward))
    pipe, report = _embed(tiny, store_path, pseudo, three_series, overlap=True)
    order = [name for name, _ in sorted(events, key=lambda e: e[1])]
    first_forward_end = order.index("forward-")
    # series 2 was being decoded while the first series' batches (of 3 slices) ran
    loads = [i for i, name in enumerate(order) if name == "load+"]
    first_batches = -(-report.series[0].slices // 3)
    last_forward_of_first = [i for i, n in enumerate(order) if n == "forward-"][first_batches - 1]
    assert loads[1] < last_forward_of_first
    # batch 2 was prepared before batch 1's forward ended
    assert [i for i, n in enumerate(order) if n == "batch+"][1] < first_forward_end
    assert pipe.profile.seconds()["wait_batch"] >= 0


def test_prefetch_is_bounded_ordered_and_raises_where_the_source_raised() -> None:
    made: list[int] = []
    gate = threading.Event()

    def source() -> Iterator[int]:
        for i in range(5):
            made.append(i)
            if i == 3:
                raise ValueError("bad item")
            yield i

    with Prefetch(source(), depth=1) as items:
        assert next(items) == 0
        time.sleep(0.1)  # the thread makes one item ahead, no more
        assert made == [0, 1]
        assert [next(items), next(items)] == [1, 2]
        with pytest.raises(ValueError, match="bad item"):
            next(items)
    stopped = Prefetch(iter(lambda: gate.wait(0.01) or 1, None), depth=2)
    stopped.close()  # an endless source: close stops its thread
    assert not stopped._thread.is_alive()


def test_embed_profile_in_json_and_as_a_table(three_series: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from radcache.service.cli import main

    args = ["embed", str(three_series / "s1"), "--model", "dinov2-tiny-random", "--profile"]
    out = CliRunner().invoke(main, [*args, "--store", str(tmp_path / "s.zarr"), "--json"])
    assert out.exit_code == 0, out.output
    prof = json.loads(out.stdout)["profile"]
    assert set(prof["seconds"]) == {
        "decode",
        "preprocess",
        "forward",
        "write",
        "wait_decode",
        "wait_batch",
    }
    assert prof["seconds"]["forward"] > 0 and prof["slices"] == 5
    assert 0 < prof["encoder_busy_fraction"] <= 1
    table = CliRunner().invoke(main, [*args, "--store", str(tmp_path / "t.zarr")])
    assert table.exit_code == 0, table.output
    assert "encoder busy" in table.stderr and "forward" in table.stderr
