"""Shared fixtures: a fixed pseudonym secret, fresh settings, the labelled random model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from radcache.embeddings import Pseudonymizer, get_settings
from radcache.embeddings.encode import Encoder, load_encoder
from radcache.service.settings import get_settings as get_service_settings

TEST_SECRET = "radcache-test-secret-0123456789"


@pytest.fixture(autouse=True)
def _isolated_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Every test gets the test secret, no stray RADCACHE_* variables, and fresh settings."""
    for name in list(os.environ):
        if name.startswith("RADCACHE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RADCACHE_PSEUDONYM_KEY", TEST_SECRET)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    get_settings.cache_clear()
    get_service_settings.cache_clear()
    yield
    get_settings.cache_clear()
    get_service_settings.cache_clear()


@pytest.fixture(scope="session")
def pseudo() -> Pseudonymizer:
    return Pseudonymizer(TEST_SECRET.encode())


@pytest.fixture(scope="session")
def tiny_fp32() -> Encoder:
    """dinov2-tiny-random (RANDOM WEIGHTS, tests only) in fp32."""
    return load_encoder("dinov2-tiny-random", device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def tiny() -> Encoder:
    """dinov2-tiny-random at the automatic precision (bf16 on CPUs that run it fast)."""
    return load_encoder("dinov2-tiny-random", device="cpu", precision="auto")


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "store.zarr"
