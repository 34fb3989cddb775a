"""All settings in one place: ``RADCACHE_*`` environment variables, overridden by CLI flags."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .keys import Pseudonymizer, load_or_create_secret
from .locks import Locks
from .models import DEFAULT_MODEL

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """radcache configuration. Every field reads ``RADCACHE_<NAME>`` from the environment."""

    model_config = SettingsConfigDict(env_prefix="RADCACHE_", extra="ignore", validate_default=True)

    model: str = Field(
        DEFAULT_MODEL, description="registry name or Hugging Face checkpoint directory"
    )
    store: str = Field("./radcache-store", description="Zarr store: a directory or an fsspec URL")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the encoder runs")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the hardware runs it fast, else fp32"
    )
    batch_size: int = Field(32, ge=1, le=4096, description="slices per forward pass")
    patch_tokens: bool = Field(True, description="store patch-token grids (fp16)")
    cls_last_n: int = Field(4, ge=0, le=40, description="store CLS of the last n blocks (0: off)")
    recipe: Path | None = Field(
        None, description="preprocessing recipe file (JSON/YAML); None: defaults"
    )
    pseudonym_key: SecretStr | None = Field(
        None, description="secret for UID pseudonyms (≥16 chars)"
    )
    pseudonym_key_file: Path = Field(
        Path("~/.config/radcache/pseudonym.key"), description="secret file, made on first use"
    )
    keep_uids: bool = Field(
        False, description="store original Study/Series UIDs instead of pseudonyms"
    )
    hf_cache_dir: str | None = Field(
        None, description="Hugging Face cache directory (default: HF_HOME)"
    )
    offline: bool | None = Field(
        None, description="never download weights (default: HF_HUB_OFFLINE)"
    )
    # --- the search index ---
    index_dir: Path | None = Field(
        None, description="where indexes are saved (default: <store>/indexes)"
    )
    index_factory: str = Field(
        "auto", description="FAISS factory string, or auto: exact below index_exact_max, else IVF"
    )
    index_exact_max: int = Field(50_000, ge=1, description="largest exact (Flat) index")
    index_recall_target: float = Field(
        0.95, gt=0, le=1, description="recall@10 an approximate index is tuned to at build time"
    )
    index_refresh_s: float = Field(
        2.0, gt=0, description="how often the service looks for embeddings written by others"
    )
    # --- the HTTP service (radcache serve) ---
    host: str = Field("127.0.0.1", description="address radcache serve listens on")
    port: int = Field(8000, ge=1, le=65535, description="port radcache serve listens on")
    db: str = Field("sqlite:///./radcache.db", description="job database (SQLAlchemy URL)")
    upload_dir: Path = Field(Path("./radcache-uploads"), description="uploads awaiting the worker")
    max_upload_bytes: int = Field(4 << 30, ge=1, description="largest accepted upload (413 beyond)")
    queue_size: int = Field(64, ge=1, description="jobs waiting for the worker before 503")
    # --- scale-out: a Redis queue and radcache worker processes ---
    queue: str | None = Field(
        None, description="Redis URL of the job queue; None: the embedded in-process worker"
    )
    queue_namespace: str = Field("radcache", description="prefix of the queue's Redis keys")
    queue_visibility_s: float = Field(
        60.0, gt=0, description="a silent worker's jobs go to another after this long"
    )
    queue_max_retries: int = Field(3, ge=0, description="retries of a failing job before dead")
    queue_backoff_s: float = Field(5.0, gt=0, description="first retry delay (doubles each time)")
    job_time_limit_s: float = Field(6 * 3600.0, gt=0, description="longest a job may run")
    worker_threads: int = Field(
        2, ge=1, le=64, description="jobs a worker runs at once (their slices share batches)"
    )
    worker_grace_s: float = Field(
        60.0, ge=0, description="on SIGTERM, how long running jobs may take to finish"
    )
    reuse_memory: bool = Field(
        True,
        description="radcache processes keep freed memory for reuse (faster; peak memory stays)",
    )
    lock_url: str | None = Field(
        None, description="Redis URL of the locks object-store writers share (default: queue)"
    )
    # --- the client commands (radcache submit | jobs | get) ---
    url: str = Field("http://127.0.0.1:8000", description="the service the client commands talk to")

    @field_validator("upload_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()  # job rows name uploads that workers elsewhere open

    @field_validator("pseudonym_key")
    @classmethod
    def _long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("RADCACHE_PSEUDONYM_KEY must be at least 16 characters")
        return v

    def store_locks(self) -> Locks | None:
        """Locks for writers of an object store (``s3://`` and other non-local URLs)."""
        url = self.lock_url or self.queue
        if url is None or "://" not in self.store or self.store.startswith("file://"):
            return None
        from .locks import RedisLocks

        return RedisLocks(url, prefix=self.queue_namespace)

    def index_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`radcache.embeddings.open_index`."""
        return {
            "directory": self.index_dir,
            "factory": self.index_factory,
            "exact_max": self.index_exact_max,
            "recall_target": self.index_recall_target,
        }

    def pseudonymizer(self) -> Pseudonymizer:
        """The keyed pseudonymizer, from the key setting or the key file (made on first use)."""
        if self.pseudonym_key is not None:
            secret = self.pseudonym_key.get_secret_value().encode()
        else:
            secret = load_or_create_secret(self.pseudonym_key_file.expanduser())
        return Pseudonymizer(secret=secret, keep_uids=self.keep_uids)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings built once, on first use (not at import)."""
    return Settings()
