"""Settings of a ``radcache`` process: the embedding library's, plus the service's own.

:class:`ServiceSettings` is the one class a ``radcache`` command builds (CLI flags over
``RADCACHE_*`` environment variables); :func:`get_settings` builds it once, on first use.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, SecretStr, field_validator

from radcache.embeddings.settings import Settings

if TYPE_CHECKING:
    from .jobs import JobStore
    from .uid_vault import UidVault

__all__ = ["ServiceSettings", "get_settings"]


class ServiceSettings(Settings):
    """radcache configuration: the library's fields and the service's (``RADCACHE_<NAME>``)."""

    # --- the HTTP service (radcache serve) ---
    host: str = Field("127.0.0.1", description="address radcache serve listens on")
    port: int = Field(8000, ge=1, le=65535, description="port radcache serve listens on")
    insecure_open: bool = Field(
        False,
        description="serve without API keys on a non-loopback address (lab use only; warned "
        "at every start)",
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="origins browsers may call from (CORS); none: off"
    )
    db: str = Field("sqlite:///./radcache.db", description="job database (SQLAlchemy URL)")
    upload_dir: Path = Field(Path("./radcache-uploads"), description="uploads awaiting the worker")
    max_upload_bytes: int = Field(4 << 30, ge=1, description="largest accepted upload (413 beyond)")
    max_json_bytes: int = Field(
        4 << 20,
        ge=1024,
        description="largest request body that is not an upload (the JSON of search, classify, "
        "…); refused with 413 json-too-large while it streams",
    )
    max_header_bytes: int = Field(
        16384, ge=1024, description="largest request line and headers (431 beyond)"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's line and headers must arrive within this (408 beyond)"
    )
    body_idle_timeout_s: float = Field(
        60.0, gt=0, description="longest wait for the next chunk of a request body (408 beyond)"
    )
    keep_alive_s: float = Field(
        5.0, gt=0, description="idle keep-alive connections close after this"
    )
    max_connections: int | None = Field(
        1000, ge=1, description="open connections before 503; None: no limit"
    )
    queue_size: int = Field(64, ge=1, description="jobs waiting for the worker before 503")
    index_refresh_s: float = Field(
        2.0, gt=0, description="how often the service looks for embeddings written by others"
    )
    index_save_s: float = Field(
        60.0, ge=0, description="a changed index is saved at most this often (and at stop)"
    )
    compact_after_s: float = Field(
        3600.0, gt=0, description="compact a table once its oldest deletion is this old"
    )
    compact_share: float = Field(
        0.1, gt=0, le=1, description="… or once this share of its rows are deleted"
    )
    erase_after_s: float = Field(
        5.0,
        gt=0,
        description="a deleted study's erasure runs once no deletion came for this long "
        "(a burst shares one pass; at the latest a minute after the first)",
    )
    # --- the DICOM receiver (a C-STORE SCP beside the HTTP service: service/dicom) ---
    dicom_port: int | None = Field(
        None, ge=1, le=65535, description="port of the DICOM C-STORE receiver; None: no receiver"
    )
    dicom_host: str | None = Field(
        None, description="address the DICOM receiver listens on; None: the HTTP host's"
    )
    ae_title: str = Field("RADCACHE", description="the receiver's own (called) AE title")
    dicom_calling_aes: dict[str, str] = Field(
        default_factory=dict,
        description="calling AE titles allowed to send (JSON object), each mapped to the "
        "prefix of an API key with the submit scope (the AE acts as that key: its tenant), "
        "or, while no API key exists, to a tenant; empty while no key exists: any AE, "
        "default tenant",
    )
    dicom_idle_s: float = Field(
        30.0, gt=0, description="a study is complete this long after its last instance"
    )
    dicom_on_release: bool = Field(
        False, description="a study is also complete when the association that sent it ends"
    )
    dicom_keep_s: float = Field(
        600.0,
        ge=0,
        description="a completed study's instances are held this long, so a late instance "
        "re-embeds its whole series; 0: not held",
    )
    dicom_max_instance_bytes: int = Field(
        1 << 30,
        ge=1,
        description="largest instance the receiver takes (spooled to disk as it arrives, "
        "refused with 0xA700 once past this)",
    )
    # --- the UID vault (opt-in): original UIDs sealed for KOS answers (service/uid_vault) ---
    uid_vault_key: SecretStr | None = Field(
        None,
        description="key of the UID vault (≥16 chars; never stored beside the data); "
        "unset: the vault is off and no original UID is kept",
    )
    kos_destination: str | None = Field(
        None,
        description="where a KOS answer asked with `send` goes: a C-STORE peer AE@HOST:PORT "
        "(called as ae_title), or a DICOMweb base URL http(s)://… (STOW-RS to its /studies); "
        "None: `send` is refused (kos-destination-unset)",
    )
    kos_destination_auth: SecretStr | None = Field(
        None,
        description="credentials for a STOW-RS kos_destination (and `radcache search --send-to "
        "URL`): USER:PASSWORD (HTTP Basic) or 'Bearer TOKEN'",
    )
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
    # --- what is kept of submissions ---
    job_retention_days: float = Field(
        7.0,
        gt=0,
        description="finished jobs (their reports name the uploaded files) and quarantined "
        "uploads are deleted this long after they finished",
    )
    quarantine_dir: Path | None = Field(
        None,
        description="uploads of jobs that did not finish done are moved here (named by job id) "
        "for inspection; None: deleted like the others",
    )
    # --- the client commands (radcache submit | jobs | get) ---
    url: str = Field("http://127.0.0.1:8000", description="the service the client commands talk to")
    api_key: SecretStr | None = Field(
        None, description="API key the client commands send (RADCACHE_API_KEY)"
    )

    @field_validator("kos_destination")
    @classmethod
    def _destination(cls, v: str | None) -> str | None:
        """A DICOMweb base URL, or a C-STORE peer as the sender parses it."""
        if v is None or re.match(r"https?://\S+$", v.strip()):
            return v.strip() if v is not None else None
        from radcache.embeddings.errors import ConfigError  # the DICOM modules only when used

        from .dicom.send import parse_destination

        try:
            parse_destination(v.strip())
        except ConfigError as exc:
            raise ValueError(
                f"{exc.message} Or give an http(s):// DICOMweb base URL (STOW-RS, e.g. "
                "https://pacs/dicom-web)."
            ) from None
        return v.strip()

    @field_validator("upload_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()  # job rows name uploads that workers elsewhere open

    @field_validator("quarantine_dir")
    @classmethod
    def _absolute_quarantine(cls, v: Path | None) -> Path | None:
        return v.expanduser().resolve() if v is not None else None

    def uid_vault(self, jobs: JobStore) -> UidVault | None:
        """The UID vault in ``jobs``' database, or None when no key is set (off)."""
        from .uid_vault import UidVault

        key = self.uid_vault_key
        return UidVault(jobs, key.get_secret_value().encode()) if key is not None else None

    def lock_server(self) -> tuple[str | None, str]:
        """Object-store writers lock through the job queue's Redis unless told otherwise."""
        return self.lock_url or self.queue, self.queue_namespace


@lru_cache(maxsize=1)
def get_settings() -> ServiceSettings:
    """Settings built once, on first use (not at import)."""
    return ServiceSettings()
