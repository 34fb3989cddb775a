"""Shared fixtures: a fixed pseudonym secret, fresh settings, the labelled random model."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from radcache.embeddings import Pseudonymizer, get_settings
from radcache.embeddings.encode import Encoder, load_encoder
from radcache.service.settings import get_settings as get_service_settings

TEST_SECRET = "radcache-test-secret-0123456789"
PG = "postgresql+psycopg://postgres@127.0.0.1:5432"


def pg_database(prefix: str) -> Iterator[str]:
    """A throwaway PostgreSQL database (its URL), dropped afterwards; skipped with the
    reason when PostgreSQL does not answer, failed instead under CI=true."""
    import sqlalchemy as sa

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {PG} is needed under CI ({exc})")
        pytest.skip(f"PostgreSQL at {PG} does not answer ({exc})")
    try:
        yield f"{PG}/{name}"
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


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


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``gpu`` needs CUDA: skipped, saying why, where torch sees none
    (``pytest -m gpu`` runs them; bench/bench_gpu.py does on a GPU machine)."""
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            pytest.skip(f"needs a CUDA device; torch {torch.__version__} ({build}) sees none")
