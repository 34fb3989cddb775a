"""Stage overlap and stage clocks of the pipeline.

:class:`Prefetch` runs an iterator on a thread of its own, at most ``depth`` items ahead
of its consumer (the item being computed counts): the pipeline decodes the next series,
and prepares the next batch, while the model runs the current one, and memory stays
bounded by what ``depth`` allows. :class:`StageTimes` adds up the seconds each stage
spent, and how long the forward waited, across runs and threads.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

__all__ = ["STAGES", "Prefetch", "StageTimes"]

T = TypeVar("T")

#: Seconds spent in each stage (whichever thread ran it), then what the consumer waited.
STAGES = (
    "decode",  # Candidate.load: read files, decode pixels, rescale, stack
    "preprocess",  # prepare() and Prepared.batch: windowing, resize, normalisation
    "forward",  # the model forward and its outputs' copies back, per batch
    "write",  # store writes: the caller's share of each put, and commit
    "wait_decode",  # the pipeline waited for the next series to be decoded (overlap)
    "wait_batch",  # the forward waited for the next batch to be prepared (overlap)
)


class StageTimes:
    """Seconds per stage, embedding wall time and slices embedded; thread-safe totals."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds = dict.fromkeys(STAGES, 0.0)
        self._wall = 0.0
        self._slices = 0

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] += seconds

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Count the time the ``with`` block takes to ``stage``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def run(self, wall: float, slices: int) -> None:
        """One embedding run ended after ``wall`` seconds, having embedded ``slices``."""
        with self._lock:
            self._wall += wall
            self._slices += slices

    def seconds(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)

    @property
    def wall(self) -> float:
        return self._wall

    @property
    def slices(self) -> int:
        return self._slices

    def busy_fraction(self) -> float:
        """Fraction of the embedding wall time the forward was running (0 before any)."""
        with self._lock:
            return min(1.0, self._seconds["forward"] / self._wall) if self._wall > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The totals as JSON: seconds per stage, wall, slices, encoder busy fraction."""
        return {
            "seconds": {k: round(v, 4) for k, v in self.seconds().items()},
            "wall_s": round(self.wall, 4),
            "slices": self.slices,
            "encoder_busy_fraction": round(self.busy_fraction(), 4),
        }


_END = object()


class Prefetch(Generic[T]):
    """Iterate ``source`` on a thread named ``name``, at most ``depth`` items ahead.

    An item is computed only when fewer than ``depth`` items are computed and not yet
    taken, so at most ``depth`` items exist beside the one the consumer holds. What the
    source raises is raised to the consumer, in order. ``on_wait`` is told how long each
    take blocked. :meth:`close` (or leaving a ``with`` block) stops the thread early.
    """

    def __init__(
        self,
        source: Iterable[T],
        *,
        depth: int = 1,
        name: str = "radcache-prefetch",
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._room = threading.Semaphore(depth)
        self._stop = threading.Event()
        self._done = False
        self._on_wait = on_wait
        self._thread = threading.Thread(
            target=self._produce, args=(source,), name=name, daemon=True
        )
        self._thread.start()

    def _produce(self, source: Iterable[T]) -> None:
        try:
            it = iter(source)
            while True:
                while not self._room.acquire(timeout=0.1):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                try:
                    item = next(it)
                except StopIteration:
                    self._items.put(_END)
                    return
                self._items.put(item)
        except BaseException as exc:  # raised to the consumer at its next take
            self._items.put(_Raised(exc))

    def __iter__(self) -> Prefetch[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        t0 = time.perf_counter()
        item = self._items.get()
        if self._on_wait is not None:
            self._on_wait(time.perf_counter() - t0)
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Raised):
            self._done = True
            raise item.exc
        self._room.release()
        return item  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop the thread (after the item it is computing) and drop what it made."""
        self._done = True
        self._stop.set()
        self._thread.join()
        while not self._items.empty():
            self._items.get_nowait()

    def __enter__(self) -> Prefetch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Raised:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
