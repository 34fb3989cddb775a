"""Dynamic batching: slices of several concurrent jobs share one model forward.

:class:`BatchingEncoder` is an :class:`~radcache.embeddings.encode.Encoder` whose
``forward`` may be called from many threads (one per job in a worker). One model thread
takes whatever requests are waiting — up to ``max_batch`` slices (a number, or a
:class:`~radcache.embeddings._budget.BatchBudget` sizing it by memory for the input
size) of the same input size and the same ``last_n`` — concatenates them, runs one
forward and hands each caller its rows. Nothing waits for a batch to fill: requests that
arrive while the model is busy are merged into the next forward, so a stream of small
studies keeps the device as busy as one large study, and a lone job runs as fast as
without batching.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from ._budget import BatchBudget
from .encode import Encoder

__all__ = ["BatchingEncoder"]


@dataclass
class _Request:
    pixels: torch.Tensor
    last_n: int
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[torch.Tensor, ...] | None = None
    error: BaseException | None = None

    def fits(self, other: _Request) -> bool:
        return self.last_n == other.last_n and self.pixels.shape[1:] == other.pixels.shape[1:]


class BatchingEncoder(Encoder):
    """The same model, cfg, precision and weights hash as ``inner``; forwards merged."""

    def __init__(self, inner: Encoder, max_batch: int | BatchBudget) -> None:  # shares inner's
        self.__dict__.update(inner.__dict__)
        self.inner = inner
        self.max_batch = max_batch
        self.merged = 0  # forwards that served more than one request
        self._requests: queue.Queue[_Request] = queue.Queue()
        self._held: deque[_Request] = deque()
        self._thread = threading.Thread(target=self._loop, name="radcache-batcher", daemon=True)
        self._thread.start()

    @property
    def forward_count(self) -> int:
        return self.inner.forward_count

    @forward_count.setter
    def forward_count(self, value: int) -> None:
        self.inner.forward_count = value

    def forward(self, pixels: torch.Tensor, *, last_n: int = 0) -> tuple[torch.Tensor, ...]:
        req = _Request(pixels, last_n)
        self._requests.put(req)
        req.done.wait()
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def _next(self, block: bool) -> _Request | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._requests.get(block=block)
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while True:
            first = self._next(block=True)
            assert first is not None
            group, n = [first], len(first.pixels)
            skipped: list[_Request] = []
            limit = self._limit(first)
            while n < limit:
                more = self._next(block=False)
                if more is None:
                    break
                if more.fits(first) and n + len(more.pixels) <= limit:
                    group.append(more)
                    n += len(more.pixels)
                else:
                    skipped.append(more)
            self._held.extendleft(reversed(skipped))
            self._run(group)

    def _limit(self, first: _Request) -> int:
        if isinstance(self.max_batch, int):
            return self.max_batch
        inner = self.inner
        size = (int(first.pixels.shape[2]), int(first.pixels.shape[3]))
        return self.max_batch.slices(inner.cfg, inner.device, inner.dtype.itemsize, size)

    def _run(self, group: list[_Request]) -> None:
        try:
            pixels = torch.cat([r.pixels for r in group]) if len(group) > 1 else group[0].pixels
            out = Encoder.forward(self.inner, pixels, last_n=group[0].last_n)
            if len(group) > 1:
                self.merged += 1
            start = 0
            for r in group:
                stop = start + len(r.pixels)
                r.result = tuple(t[start:stop] if t.numel() else t for t in out)
                start = stop
        except BaseException as exc:  # every caller learns of it
            for r in group:
                r.error = exc
        finally:
            for r in group:
                r.done.set()
