"""An object store is written only with a lock backend: ``memory://`` is a non-local fsspec
URL, like ``s3://``, so a writer without Redis locks is refused before the model loads,
unless it says it is the only writer. Reading needs no locks."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from radcache.embeddings import Pipeline, Settings, open_store
from radcache.embeddings.encode import Encoder
from radcache.embeddings.errors import ConfigError
from radcache.embeddings.store.locks import RedisLocks
from radcache.service.settings import ServiceSettings
from tests.dicomgen import phantom, write_series
from tests.test_cli import run

REDIS = "redis://127.0.0.1:6379/0"


def _memory_url() -> str:
    return f"memory://radcache-locks-{uuid.uuid4().hex[:8]}"


def test_an_object_store_without_locks_is_refused_before_the_model_loads() -> None:
    url = _memory_url()
    # A model no registry knows: loading it would fail differently, so nothing loaded.
    settings = Settings(store=url, model="no-such-model")
    with pytest.raises(ConfigError) as caught:
        Pipeline.from_settings(settings)
    msg = str(caught.value)
    assert url in msg and "RADCACHE_LOCK_URL" in msg and "RADCACHE_QUEUE" in msg
    assert "RADCACHE_STORE_SINGLE_WRITER=true" in msg
    # Credentials in the URL stay out of the message.
    with pytest.raises(ConfigError) as caught:
        Settings(store="s3://key:secret@bucket/store").store_locks()
    assert "secret" not in str(caught.value) and "s3://bucket/store" in str(caught.value)


def test_lock_backends_and_the_single_writer_setting(
    tiny_fp32: Encoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _memory_url()
    locks = Settings(store=url, lock_url=REDIS).store_locks()
    assert isinstance(locks, RedisLocks) and locks.prefix == "radcache"
    by_queue = ServiceSettings(store=url, queue=REDIS, queue_namespace="rc-x").store_locks()
    assert isinstance(by_queue, RedisLocks) and by_queue.prefix == "rc-x"
    for local in (str(tmp_path / "s.zarr"), f"file://{tmp_path / 's.zarr'}"):
        assert Settings(store=local).store_locks() is None  # flock on the directory
    # The one writer, told so by the environment, embeds without locks; readers need none.
    monkeypatch.setenv("RADCACHE_STORE_SINGLE_WRITER", "true")
    pipe = Pipeline.from_settings(Settings(store=url), encoder=tiny_fp32)
    (done,) = pipe.embed([write_series(tmp_path / "ct", phantom(3, 16, 16)).directory]).series
    written = pipe.store.read(done.entry, "cls")
    np.testing.assert_array_equal(open_store(url).read(done.entry, "cls"), written)


def test_the_cli_says_why_and_exits(tmp_path: Path) -> None:
    study = write_series(tmp_path / "ct", phantom(2, 8, 8)).directory
    p = run("embed", str(study), "--model", "dinov2-tiny-random", "--store", _memory_url())
    assert p.returncode == 2, p.stderr
    assert "[invalid-config]" in p.stderr and "RADCACHE_LOCK_URL" in p.stderr
    assert "Traceback" not in p.stderr
