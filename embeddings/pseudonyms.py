"""Pseudonyms for DICOM identifiers, and the deployment secret they are keyed with.

Studies, series and patients are named by ``HMAC-SHA256(secret, kind + ":" + uid)``
(first 32 hex digits), so the store never holds a UID or patient ID, while the same
study always maps to the same name within one deployment. The secret lives outside the
store (an environment variable or a key file); the store records only a fingerprint of
it, so a store opened with the wrong secret is noticed rather than silently forked.

Each tenant is a pseudonym domain of its own: outside :data:`DEFAULT_TENANT` the tenant's
name is part of every HMAC message, so the same study sent by two tenants gets two
unrelated names (and two unrelated file digests), and nothing links them.

A NIfTI, NRRD or MetaImage file carries no UID: its series (and, unless the sender names
one, its study) is named by the keyed pseudonym of the file's hash (:meth:`Pseudonymizer.
keyed_name`), and the patient and study the sender names with :class:`InputRefs` are
pseudonymised as a DICOM file's PatientID and StudyInstanceUID are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from .errors import ConfigError, InvalidFieldError

__all__ = ["DEFAULT_TENANT", "InputRefs", "Pseudonymizer", "load_or_create_secret"]

Kind = Literal["study", "series", "patient", "frame"]
_DIGITS = 32
#: The tenant of a deployment without API keys, and of everything stored before tenants.
DEFAULT_TENANT = "default"
#: What a patient or study reference may be: 1–64 characters, no control character or
#: backslash (what a DICOM PatientID or StudyInstanceUID may hold).
REFERENCE = re.compile(r"[^\x00-\x1f\x7f\\]{1,64}")


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
        return self.keyed_name(kind, value)

    def keyed_name(self, kind: Kind, value: str) -> str:
        """The keyed pseudonym of ``value`` even where UIDs are kept: for names made from a
        file's content (a NIfTI file has no UID to keep, and its hash must not be stored)."""
        msg = f"{self._domain()}{kind}:{value}".encode()
        mac = hmac.new(self.secret, msg, hashlib.sha256)
        return mac.hexdigest()[:_DIGITS]

    def refs(self, *, patient: str | None = None, study: str | None = None) -> InputRefs:
        """The names of a sender's patient and study references (a PatientID and a
        StudyInstanceUID, or a data set's own identifiers), pseudonymised as a DICOM file's
        are: a NIfTI sent with a DICOM study's PatientID and StudyInstanceUID gets that
        study's patient and study names. :class:`InvalidFieldError` for a reference that
        is empty, longer than 64 characters, or holds a control character or backslash
        (what a PatientID or UID cannot hold); the message never quotes it."""
        return InputRefs(patient=self._ref("patient", patient), study=self._ref("study", study))

    def _ref(self, kind: Literal["patient", "study"], given: str | None) -> str | None:
        if given is None:
            return None
        value = given.strip()
        if not REFERENCE.fullmatch(value):
            raise InvalidFieldError(
                f"the {kind} reference has {len(value)} characters; expected 1–64 characters "
                "without control characters or backslashes (a PatientID or a StudyInstanceUID)."
            )
        return self.name(kind, value)

    def file_digest(self, data: bytes | IO[bytes]) -> str:
        """Keyed digest of a file's bytes (or of a file object, read to its end a MiB at a
        time): recognises a re-sent file without storing its hash.

        xxh3 of the bytes (fast), then HMAC under the secret, so the store cannot be used
        to confirm a guess of a file's content. ``keep_uids`` is part of the key because
        it changes the names the file's series gets.
        """
        import xxhash

        if isinstance(data, bytes):
            raw = xxhash.xxh3_128_digest(data)
        else:
            h = xxhash.xxh3_128()
            while chunk := data.read(1 << 20):
                h.update(chunk)
            raw = h.digest()
        msg = self._domain().encode() + b"file:" + (b"uids:" if self.keep_uids else b"") + raw
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()[:_DIGITS]

    def fingerprint(self) -> str:
        """A short public fingerprint of the secret, recorded in the store."""
        return hmac.new(self.secret, b"radcache-fingerprint", hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class InputRefs:
    """The patient and study a submission's non-DICOM volumes (NIfTI, NRRD, MetaImage)
    belong to, as pseudonyms (:meth:`Pseudonymizer.refs` makes them from the sender's
    references). DICOM volumes are named by their own headers."""

    patient: str | None = None
    study: str | None = None

    def __bool__(self) -> bool:
        return self.patient is not None or self.study is not None
