"""What routes depend on: the resources loaded once per app, reached through
:data:`ResourcesDep` (routes import this module, never the app)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request

from radcache.embeddings import EmbeddingStore, Encoder, IndexSet, Pipeline, Searcher

from .jobs import JobStore
from .keys import KeyStore
from .metrics import Metrics
from .queue import RedisQueue
from .settings import ServiceSettings
from .uid_vault import UidVault
from .worker import IndexKeeper, Worker

__all__ = ["Receiver", "Resources", "ResourcesDep", "get_resources", "model_loaded"]


class Receiver(Protocol):
    """The DICOM receiver, as readiness sees it (:class:`.dicom.scp.DicomReceiver`)."""

    def state(self) -> tuple[bool, str]: ...


@dataclass
class Resources:
    """The model, store, pipeline, job database, worker, indexes and API keys of one app."""

    settings: ServiceSettings
    encoder: Encoder
    store: EmbeddingStore
    pipeline: Pipeline
    jobs: JobStore
    worker: Worker | RedisQueue
    metrics: Metrics
    indexes: IndexSet
    searcher: Searcher
    keeper: IndexKeeper
    keys: KeyStore
    vault: UidVault | None = None  # the UID vault; None: off
    receiver: Receiver | None = None  # the DICOM receiver, once started (dicom_port set)

    def ready(self) -> tuple[bool, str]:
        """Worker and index keeper alive, store writable, the model not failed — or why
        not. A model whose weights are still loading (`radcache serve` loads them beside
        everything else) does not hold readiness back: listings, reads and search by name
        need none, and submissions wait in the queue for it."""
        failure = getattr(self.encoder, "failure", None) if not model_loaded(self) else None
        if failure:
            return False, f"the model could not be loaded: {failure}"
        if not self.worker.alive:
            if isinstance(self.worker, RedisQueue):
                return False, f"the job queue at {self.settings.queue} does not answer"
            return False, "the worker thread is not running"
        if not self.keeper.alive:
            return False, "the index keeper thread is not running"
        if self.store.local_path is not None and not os.access(self.store.local_path, os.W_OK):
            return False, f"the store {self.store.url} is not writable"
        if self.settings.dicom_port is not None:
            listening, why = self.dicom_state()
            if not listening:
                return False, f"the DICOM receiver is not ready: {why}"
        return True, "ok"

    def dicom_state(self) -> tuple[bool, str]:
        """The DICOM receiver's state (``dicom_port`` set): listening, or why not."""
        if self.receiver is None:
            return False, "it is not started"
        return self.receiver.state()

    def job_done(self, seconds: float, series: list[dict[str, Any]]) -> None:
        """A job of this process finished: count it, and make what it stored searchable
        (with the labels it was given) before the job reads done. A job that stored
        nothing new (every series a cache hit, as when the intake answers from the cache)
        needs no index refresh, so it never waits behind a rebuild."""
        self.metrics.job(seconds, series)
        if any(s.get("cache") != "hit" for s in series):
            self.keeper.refresh()
        self.keeper.touch(s["entry"] for s in series)


def model_loaded(res: Resources) -> bool:
    """Whether the model's weights are in (False while they load in the background)."""
    return bool(getattr(res.encoder, "loaded", True))


async def get_resources(request: Request) -> Resources:
    """The app's resources (``async``: reading them needs no worker thread)."""
    res: Resources = request.app.state.resources
    return res


ResourcesDep = Annotated[Resources, Depends(get_resources)]
