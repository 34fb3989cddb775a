"""Pseudonyms for DICOM identifiers, and the deployment secret they are keyed with.

Studies, series and patients are named by ``HMAC-SHA256(secret, kind + ":" + uid)``
(first 32 hex digits), so the store never holds a UID or patient ID, while the same
study always maps to the same name within one deployment. The secret lives outside the
store (an environment variable or a key file); the store records only a fingerprint of
it, so a store opened with the wrong secret is noticed rather than silently forked.

Each tenant is a pseudonym domain of its own: outside :data:`DEFAULT_TENANT` the tenant's
name is part of every HMAC message, so the same study sent by two tenants gets two
unrelated names (and two unrelated file digests), and nothing links them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import ConfigError

__all__ = ["DEFAULT_TENANT", "Pseudonymizer", "load_or_create_secret"]

Kind = Literal["study", "series", "patient", "frame"]
_DIGITS = 32
#: The tenant of a deployment without API keys, and of everything stored before tenants.
DEFAULT_TENANT = "default"


def load_or_create_secret(path: Path) -> bytes:
    """Read the deployment secret from ``path``, creating it (mode 0600) on first use."""
    try:
        data = path.read_bytes().strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key + b"\n")
        return key
    if len(data) < 16:
        raise ConfigError(
            f"pseudonym key file {path} holds {len(data)} bytes; expected at least 16. "
            "Delete it to have a new one made, or set RADCACHE_PSEUDONYM_KEY."
        )
    return data


@dataclass(frozen=True)
class Pseudonymizer:
    """Maps DICOM UIDs and patient IDs to keyed pseudonyms (or keeps UIDs when asked).

    It is also what ingest asks how much header text to keep: ``keep_descriptions`` keeps
    series descriptions, cleaned of each file's identifying values; without it none is kept.
    """

    secret: bytes
    keep_uids: bool = False
    tenant: str = DEFAULT_TENANT
    keep_descriptions: bool = False

    def __post_init__(self) -> None:
        if len(self.secret) < 16:
            raise ConfigError(
                f"the pseudonym secret has {len(self.secret)} bytes; expected at least 16."
            )

    def __repr__(self) -> str:  # never print the secret
        return (
            f"Pseudonymizer(keep_uids={self.keep_uids}, tenant={self.tenant!r}, "
            f"keep_descriptions={self.keep_descriptions})"
        )

    def for_tenant(self, tenant: str) -> Pseudonymizer:
        """The same secret, naming in ``tenant``'s domain."""
        return dataclasses.replace(self, tenant=tenant)

    def _domain(self) -> str:
        return "" if self.tenant == DEFAULT_TENANT else f"tenant={self.tenant}/"

    def name(self, kind: Kind, value: str) -> str:
        """Pseudonym of ``value``; UIDs pass through if ``keep_uids`` (patient IDs never do)."""
        if self.keep_uids and kind != "patient":
            return value
        msg = f"{self._domain()}{kind}:{value}".encode()
        mac = hmac.new(self.secret, msg, hashlib.sha256)
        return mac.hexdigest()[:_DIGITS]

    def file_digest(self, data: bytes) -> str:
        """Keyed digest of a file's bytes: recognises a re-sent file without storing its hash.

        xxh3 of the bytes (fast), then HMAC under the secret, so the store cannot be used
        to confirm a guess of a file's content. ``keep_uids`` is part of the key because
        it changes the names the file's series gets.
        """
        import xxhash

        raw = xxhash.xxh3_128_digest(data)
        msg = self._domain().encode() + b"file:" + (b"uids:" if self.keep_uids else b"") + raw
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()[:_DIGITS]

    def fingerprint(self) -> str:
        """A short public fingerprint of the secret, recorded in the store."""
        return hmac.new(self.secret, b"radcache-fingerprint", hashlib.sha256).hexdigest()[:16]
