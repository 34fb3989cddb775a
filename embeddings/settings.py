"""Settings of the embedding library: ``RADCACHE_*`` environment variables.

The service adds its own fields (host, port, job database, queue, worker) in
:class:`radcache.service.settings.ServiceSettings`, a subclass: a ``radcache`` process
builds that one class once, with CLI flags over the environment.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._device import DEVICE_PATTERN
from .errors import ConfigError
from .models import DEFAULT_MODEL
from .patch_forms import DEFAULT_PATCH_STORAGE, PATCH_STORAGE_PATTERN, parse_storage
from .pseudonyms import Pseudonymizer, load_or_create_secret
from .store.locks import Locks

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """radcache configuration. Every field reads ``RADCACHE_<NAME>`` from the environment."""

    model_config = SettingsConfigDict(env_prefix="RADCACHE_", extra="ignore", validate_default=True)

    model: str = Field(
        DEFAULT_MODEL, description="registry name or Hugging Face checkpoint directory"
    )
    store: str = Field("./radcache-store", description="Zarr store: a directory or an fsspec URL")
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="where the encoder runs: auto (CUDA where torch sees it), cpu, cuda or "
        "cuda:N; a GPU torch does not see is refused when the model loads",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 on CUDA at compute capability ≥ 8.0 and fp16 autocast below; "
        "on a CPU bf16 where it runs natively (AVX-512 BF16/AMX), else fp32",
    )
    compile: bool = Field(
        False,
        description="torch.compile the forward for fixed batch shapes (CUDA graphs on CUDA); "
        "the first batch of each input size compiles (tens of seconds)",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="at most this many slices per forward pass; unset: 32 on a CPU, 512 on "
        "a GPU; fewer where batch_memory_mb needs it",
    )
    batch_memory_mb: int | None = Field(
        None,
        ge=16,
        description="memory one forward may use (activations, preprocessing, outputs), in "
        "MiB: a batch holds as many slices as fit; unset: half the GPU's free memory once "
        "the model is loaded, or a quarter of the available RAM up to 4 GiB on a CPU",
    )
    decode_workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="processes decoding JPEG, JPEG-LS and JPEG 2000 DICOM pixel data a few "
        "files ahead, in `radcache embed`, `serve` and `worker`; unset: one per core (at "
        "most 16); 0: in the loading thread",
    )
    overlap: bool = Field(
        False,
        description="decode the next series and prepare the next batch while the model runs "
        "(memory: two series and two batches) rather than one stage after another; off by "
        "default: on a 2-core CPU it gained nothing (bench/README.md)",
    )
    patch_storage: str = Field(
        DEFAULT_PATCH_STORAGE,
        pattern=PATCH_STORAGE_PATTERN,
        description="how patch-token grids are kept: fp16, int8 (per-token scale), pooled:N "
        "(area-pooled to N×N) or none; int8 by default: half of fp16's bytes, every token "
        "within a cosine of 0.99995 of fp16 and the same segmentation Dice on the MNI152 "
        "template (bench/README.md, patch storage)",
    )
    patch_tokens: bool | None = Field(
        None,
        description="older flag, an alias when patch_storage is not given: true is fp16, "
        "false none",
    )
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
    keep_descriptions: bool = Field(
        False,
        description="store series descriptions, cleaned of names, IDs, dates and institution "
        "(default: none stored)",
    )
    hf_cache_dir: str | None = Field(
        None, description="Hugging Face cache directory (default: HF_HOME)"
    )
    offline: bool | None = Field(
        None, description="never download weights (default: HF_HUB_OFFLINE)"
    )
    weights_hash_file: Path = Field(
        Path("~/.cache/radcache/weights-hashes.json"),
        description="remembered weights hashes of checkpoints, by their files' path, size and "
        "mtime: a fully cached `radcache embed` answers without loading the model",
    )
    # --- the search index ---
    index_dir: Path | None = Field(
        None, description="where indexes are saved (default: <store>/indexes)"
    )
    index_factory: str = Field(
        "auto", description="FAISS factory string, or auto: exact below index_exact_max, else IVF"
    )
    index_exact_max: int = Field(10_000, ge=1, description="largest exact (Flat) index")
    index_recall_target: float = Field(
        0.95, gt=0, le=1, description="recall@10 an approximate index is tuned to at build time"
    )
    reuse_memory: bool = Field(
        True,
        description="radcache processes keep freed memory for reuse (faster; peak memory stays)",
    )
    lock_url: str | None = Field(
        None, description="Redis URL of the locks object-store writers share (default: queue)"
    )
    store_single_writer: bool = Field(
        False,
        description="exactly one process writes this object store: it may run without locks",
    )
    # --- hostile input: what one upload (or one run's inputs) may declare and inflate to ---
    max_voxels: int = Field(
        1 << 29,
        ge=1,
        description="most voxels one file or series may declare (rows × columns × slices × "
        "samples; 2²⁹ fits a 512 × 512 × 2048 CT, 2 GiB as float32, the memory a loaded "
        "series takes), checked from its header before any voxel is read or decoded",
    )
    max_decompressed_bytes: int = Field(
        16 << 30,
        ge=1,
        description="most bytes one upload may inflate to (zip members, gzipped NIfTI, "
        "compressed NRRD/MetaImage and DICOM pixel data), counted as it inflates",
    )

    @model_validator(mode="after")
    def _patch_alias(self) -> Settings:
        if self.patch_tokens is not None and "patch_storage" not in self.model_fields_set:
            self.patch_storage = parse_storage(self.patch_tokens)  # patch_storage, given, wins
        return self

    @field_validator("pseudonym_key")
    @classmethod
    def _long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("RADCACHE_PSEUDONYM_KEY must be at least 16 characters")
        return v

    def lock_server(self) -> tuple[str | None, str]:
        """(Redis URL, key prefix) of the locks object-store writers share."""
        return self.lock_url, "radcache"

    def store_locks(self) -> Locks | None:
        """Locks for a process that writes the store. A local store needs none (it locks
        with ``flock``); an object store (``s3://`` and other non-local fsspec URLs) takes
        Redis locks at :meth:`lock_server`, or none when ``store_single_writer`` says this
        is its only writer. Without either it is refused (:class:`ConfigError`): writers
        that do not lock overwrite each other's commits."""
        if "://" not in self.store or self.store.startswith("file://"):
            return None
        url, prefix = self.lock_server()
        if url is None:
            if self.store_single_writer:
                return None
            shown = re.sub(r"//[^/@]*@", "//", self.store)  # no credentials in messages
            raise ConfigError(
                f"the store {shown} is object storage, and no lock server is set: "
                "processes writing it would not lock against each other. Set "
                "RADCACHE_LOCK_URL (or RADCACHE_QUEUE) to a Redis URL, or "
                "RADCACHE_STORE_SINGLE_WRITER=true if this is the only process that writes it."
            )
        from .store.locks import RedisLocks

        return RedisLocks(url, prefix=prefix)

    def index_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`radcache.embeddings.open_index`."""
        return {
            "directory": self.index_dir,
            "factory": self.index_factory,
            "exact_max": self.index_exact_max,
            "recall_target": self.index_recall_target,
        }

    @property
    def batch_memory_bytes(self) -> int | None:
        """``batch_memory_mb`` in bytes (None: sized by the device, ``_budget``)."""
        return None if self.batch_memory_mb is None else self.batch_memory_mb << 20

    def pseudonymizer(self) -> Pseudonymizer:
        """The keyed pseudonymizer, from the key setting or the key file (made on first use)."""
        if self.pseudonym_key is not None:
            secret = self.pseudonym_key.get_secret_value().encode()
        else:
            secret = load_or_create_secret(self.pseudonym_key_file.expanduser())
        return Pseudonymizer(
            secret=secret, keep_uids=self.keep_uids, keep_descriptions=self.keep_descriptions
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings built once, on first use (not at import)."""
    return Settings()
