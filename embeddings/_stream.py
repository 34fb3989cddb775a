"""How the pipeline feeds the model: series after series, batch after batch, either one
stage after another or overlapped (``Pipeline.overlap``).

Overlapped, a decode thread loads the next series that is not cached while the current
one is encoded, and a batch thread prepares the next batch while the model runs the
current one (:class:`._overlap.Prefetch`, one item ahead each): memory is then at most two
decoded series and two prepared batches beside the model's own, against one of each in
sequence. The outputs are the same arrays either way (``tests/test_overlap.py``); every
stage's seconds go to ``Pipeline.profile`` (:class:`._overlap.StageTimes`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ._overlap import Prefetch, StageTimes
from .encode import SliceEmbeddings
from .errors import InputError
from .results import EmbedReport, Progress

if TYPE_CHECKING:
    from .ingest import Candidate
    from .pipeline import Pipeline
    from .preprocess import Prepared
    from .volume import Volume

__all__ = ["embed_candidates", "encode_prepared"]

log = logging.getLogger("radcache.embeddings.pipeline")  # the pipeline's own log


def _load(cand: Candidate, times: StageTimes) -> Volume | InputError:
    """The candidate's volume, or the input error that refused it."""
    try:
        with times.timed("decode"):
            return cand.load()
    except InputError as exc:
        return exc


def _loads(misses: list[Candidate], times: StageTimes) -> Iterator[Volume | InputError]:
    misses.reverse()
    while misses:
        yield _load(misses.pop(), times)  # each candidate let go once it is loaded


def embed_candidates(
    pipe: Pipeline,
    candidates: list[Candidate],
    known: Mapping[str, str],
    report: EmbedReport,
    progress: Progress | None,
) -> None:
    """Embed (or answer from the store) each candidate in order, into ``report``.

    In sequence, each candidate is looked up, loaded and embedded before the next. With
    ``pipe.overlap`` the cached ones are looked up first (file digests, no pixels), then
    the rest are loaded on a decode thread one series ahead of the encoder."""
    times = pipe.profile
    pending = candidates  # headers only; each is let go once it is done
    pending.reverse()
    if not pipe.overlap:
        while pending:
            cand = pending.pop()
            try:
                result = pipe._stored_candidate(cand, known)
                if result is None:
                    loaded = _load(cand, times)
                    if isinstance(loaded, InputError):
                        raise loaded
                    result = pipe._embed_candidate(cand, progress, loaded)
                elif progress is not None:
                    progress.advance(cand.n_slices)
                report.series.append(result)
            except InputError as exc:
                _rejected(report, exc)
            del cand
        return
    order: list[tuple[Candidate, Any]] = []
    while pending:
        cand = pending.pop()
        try:
            order.append((cand, pipe._stored_candidate(cand, known)))
        except InputError as exc:
            order.append((cand, exc))
    misses = [cand for cand, found in order if found is None]
    with Prefetch(
        _loads(misses, times),
        depth=1,
        name="radcache-decode",
        on_wait=lambda s: times.add("wait_decode", s),
    ) as volumes:
        for cand, found in order:
            try:
                if isinstance(found, InputError):
                    raise found
                if found is not None:
                    if progress is not None:
                        progress.advance(cand.n_slices)
                    report.series.append(found)
                    continue
                loaded = next(volumes)
                if isinstance(loaded, InputError):
                    raise loaded
                report.series.append(pipe._embed_candidate(cand, progress, loaded))
                del loaded
            except InputError as exc:
                _rejected(report, exc)


def _rejected(report: EmbedReport, exc: InputError) -> None:
    report.errors.append(exc)
    log.info("a series was rejected: %s", exc.code)  # not its file names


def _timed_batches(prepared: Prepared, size: int, device: Any, times: StageTimes) -> Iterator[Any]:
    for start in range(0, prepared.n, size):
        with times.timed("preprocess"):
            batch = prepared.batch(start, min(start + size, prepared.n), device=device)
        yield batch


def encode_prepared(
    pipe: Pipeline,
    prepared: Prepared,
    *,
    patch_tokens: bool,
    last_n: int,
    progress: Progress | None,
    on_batch: Callable[[int, SliceEmbeddings], None],
) -> SliceEmbeddings:
    """Run the pipeline's encoder over every batch of ``prepared`` (made on the encoder's
    device), handing each batch's outputs to ``on_batch`` (counted as writes); with
    ``pipe.overlap`` the next batch is prepared while the model runs."""
    times, enc = pipe.profile, pipe.encoder
    size = pipe.batching.for_prepared(enc, prepared)
    batches: Any = _timed_batches(prepared, size, enc.device, times)
    if pipe.overlap:
        batches = Prefetch(
            batches, depth=1, name="radcache-batches", on_wait=lambda s: times.add("wait_batch", s)
        )
    written = [0.0]

    def put(start: int, part: SliceEmbeddings) -> None:
        t0 = time.perf_counter()
        on_batch(start, part)
        written[0] += time.perf_counter() - t0

    def fed() -> Iterator[Any]:
        """The batches, each one's forward timed from its hand-over to the next request
        (the forward, its copies back and the caller's share of its writes, less those)."""
        for batch in batches:
            t0, w0 = time.perf_counter(), written[0]
            yield batch
            times.add("forward", time.perf_counter() - t0 - (written[0] - w0))

    try:
        emb = enc.encode(
            fed(),
            patch_tokens=patch_tokens,
            last_n=last_n,
            progress=progress.advance if progress is not None else None,
            on_batch=put,
        )
    finally:
        if isinstance(batches, Prefetch):
            batches.close()
    times.add("write", written[0])
    return emb
