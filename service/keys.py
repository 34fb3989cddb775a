"""API keys: who calls the service, for which tenant, with which scopes.

A key is a token ``rc_<prefix>_<secret>``: ``prefix`` is 8 random lowercase hex digits
that name the key in listings and logs (not secret), ``secret`` is
``secrets.token_urlsafe(32)`` (256 random bits). The token is shown once, when the key is
made (``radcache keys create``); the job database (table ``api_keys``, migration ``0004``)
keeps only the prefix, the tenant, the scopes, a per-key random 16-byte salt and
``HMAC-SHA256(salt, token)``. Verifying recomputes that digest and compares it in constant
time (:func:`hmac.compare_digest`).

Why a keyed hash and not a slow password hash (bcrypt, scrypt, Argon2): those exist to make
guessing low-entropy passwords expensive. A token carries 256 random bits, beyond any
guessing however fast the hash, so a slow hash would only cost time on every request. The
salt makes equal tokens hash differently, so the table says nothing about which keys match.

Verification is cached in-process for at most :data:`CACHE_S` seconds (keyed by a hash of
the token, never the token; unknown tokens are not cached), so a key revoked or expired by
another process stops working within about a second. ``last_used`` is written at most once
per :data:`TOUCH_S` seconds per key, not on every request.
"""

from __future__ import annotations

import builtins
import datetime as dt
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import String, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from radcache.embeddings.errors import InvalidFieldError, NotFoundError, UnauthenticatedError

from .jobs import Base, JobStore, UtcDateTime

__all__ = [
    "CACHE_S",
    "SCOPES",
    "TOUCH_S",
    "ApiKeyRow",
    "KeyInfo",
    "KeyStore",
    "Principal",
    "check_tenant",
]

#: ``metrics`` reads /metrics alone: a Prometheus scraper's key reads no study.
SCOPES: tuple[str, ...] = ("submit", "read", "search", "admin", "metrics")
CACHE_S = 1.0  # longest a verification (or any_active) answer is reused in-process
TOUCH_S = 60.0  # last_used is written at most this often per key
_TENANT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_TOKEN = re.compile(r"^rc_([0-9a-f]{8})_([A-Za-z0-9_-]{32,128})$")
_CACHE_MAX = 4096  # cached verifications kept before old ones are dropped
_USAGE = "send it as `Authorization: Bearer <key>` (clients: RADCACHE_API_KEY)"

KeyState = Literal["active", "expired", "revoked"]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    prefix: Mapped[str] = mapped_column(String(16), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    scopes: Mapped[str] = mapped_column(String(100))  # comma-joined
    salt: Mapped[str] = mapped_column(String(32))  # hex of 16 random bytes
    digest: Mapped[str] = mapped_column(String(64))  # hex of HMAC-SHA256(salt, token)
    created: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    last_used: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    expires: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    revoked: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: a tenant and its scopes. ``key`` is the key's prefix, or None
    for the open (anonymous) principal of a service without keys."""

    tenant: str
    scopes: frozenset[str]
    key: str | None

    def allows(self, scope: str) -> bool:
        """Whether this principal may do what ``scope`` covers (``admin`` covers all)."""
        return "admin" in self.scopes or scope in self.scopes


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a key: never the token or its hash."""

    prefix: str
    tenant: str
    scopes: tuple[str, ...]
    created: dt.datetime
    last_used: dt.datetime | None
    expires: dt.datetime | None
    revoked: dt.datetime | None

    def state(self, now: dt.datetime | None = None) -> KeyState:
        """``revoked``, ``expired`` (at ``now``, default the current time) or ``active``."""
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and (now or _now()) >= self.expires:
            return "expired"
        return "active"

    def active(self, now: dt.datetime | None = None) -> bool:
        """Whether the key verifies at ``now`` (default the current time)."""
        return self.state(now) == "active"

    @classmethod
    def of(cls, row: ApiKeyRow) -> KeyInfo:
        return cls(
            prefix=row.prefix,
            tenant=row.tenant,
            scopes=tuple(s for s in row.scopes.split(",") if s),
            created=row.created,
            last_used=row.last_used,
            expires=row.expires,
            revoked=row.revoked,
        )


@dataclass(frozen=True)
class _Verified:
    principal: Principal
    expires: dt.datetime | None
    until: float  # monotonic time this answer may be reused until


def check_tenant(tenant: str) -> str:
    """``tenant`` if it is a valid tenant name, else :class:`InvalidFieldError`."""
    if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
        raise InvalidFieldError(
            f"tenant {tenant!r} is not a valid name: expected 1-64 characters of lowercase "
            "letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(^[a-z0-9][a-z0-9._-]{0,63}$)"
        )
    return tenant


def _check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    given = [scopes] if isinstance(scopes, str) else list(scopes)
    wanted = {s.strip() for g in given for s in str(g).split(",") if s.strip()}
    unknown = sorted(wanted - set(SCOPES))
    if not wanted or unknown:
        seen = f"unknown scopes {', '.join(map(repr, unknown))}" if unknown else "no scopes"
        raise InvalidFieldError(
            f"{seen}: a key needs one or more of {', '.join(SCOPES)} "
            "(admin covers the others), e.g. --scopes submit,read"
        )
    return tuple(s for s in SCOPES if s in wanted)


def _digest(salt: bytes, token: str) -> str:
    return hmac.new(salt, token.encode(), hashlib.sha256).hexdigest()


def _new_prefix() -> str:
    return secrets.token_hex(4)


class KeyStore:
    """Make, list, revoke and verify API keys, in the job database's ``api_keys`` table.
    Safe to share between threads; several processes may share the database."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs
        self._lock = threading.Lock()
        self._verified: dict[str, _Verified] = {}  # sha256(token) -> a recent verification
        self._any_active: tuple[float, bool] | None = None  # (monotonic until, answer)

    def create(
        self, tenant: str, scopes: Iterable[str], *, expires_days: float | None = None
    ) -> tuple[str, KeyInfo]:
        """A new key for ``tenant`` with ``scopes`` (a subset of :data:`SCOPES`), expiring
        after ``expires_days`` (None: never). Returns the token, which is not kept: show it
        once, and its :class:`KeyInfo`."""
        tenant, chosen = check_tenant(tenant), _check_scopes(scopes)
        if expires_days is not None and not expires_days > 0:
            raise InvalidFieldError(
                f"expires_days is {expires_days}: expected a positive number of days "
                "(or none, for a key that does not expire)"
            )
        created = _now()
        expires = None if expires_days is None else created + dt.timedelta(days=expires_days)
        for _ in range(8):  # 2^32 prefixes: a collision is rare, two in a row rarer still
            prefix = _new_prefix()
            token = f"rc_{prefix}_{secrets.token_urlsafe(32)}"
            salt = secrets.token_bytes(16)
            row = ApiKeyRow(
                prefix=prefix,
                tenant=tenant,
                scopes=",".join(chosen),
                salt=salt.hex(),
                digest=_digest(salt, token),
                created=created,
                last_used=None,
                expires=expires,
                revoked=None,
            )
            try:
                with self.jobs.session() as s:
                    s.add(row)
            except IntegrityError:
                continue
            with self._lock:
                self._any_active = None
            return token, KeyInfo.of(row)
        raise RuntimeError("no free key prefix after 8 tries")  # pragma: no cover

    def list(self) -> builtins.list[KeyInfo]:
        """Every key, active or not, oldest first."""
        with self.jobs.session() as s:
            rows = s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created, ApiKeyRow.prefix))
            return [KeyInfo.of(r) for r in rows]

    def info(self, prefix: str) -> KeyInfo | None:
        """The key ``prefix``, active or not (None when no key has it)."""
        with self.jobs.session() as s:
            row = s.get(ApiKeyRow, prefix)
            return KeyInfo.of(row) if row is not None else None

    def revoke(self, prefix: str) -> KeyInfo:
        """Revoke the key ``prefix`` (it stops verifying everywhere within about a second);
        a key already revoked stays as it was."""
        with self.jobs.session() as s:
            row = s.get(ApiKeyRow, prefix, with_for_update=not self.jobs.sqlite)
            if row is None:
                raise NotFoundError(
                    f"no API key has the prefix {prefix!r}: expected one that "
                    "`radcache keys list` shows"
                )
            if row.revoked is None:
                row.revoked = _now()
            info = KeyInfo.of(row)
        with self._lock:
            self._verified = {h: v for h, v in self._verified.items() if v.principal.key != prefix}
            self._any_active = None
        return info

    def verify(self, token: str) -> Principal:
        """The principal of ``token``; :class:`UnauthenticatedError` if it is malformed,
        unknown, revoked or expired (the message never quotes the token)."""
        match = _TOKEN.fullmatch(token) if isinstance(token, str) else None
        if match is None:
            raise UnauthenticatedError(
                "the API key is malformed: expected rc_<8 hex digits>_<secret> exactly as "
                f"`radcache keys create` printed it; {_USAGE}"
            )
        hit = self.recent(token)
        if hit is not None:
            return hit
        cache_key = hashlib.sha256(token.encode()).hexdigest()
        now, tick = _now(), time.monotonic()
        principal, expires = self._lookup(match.group(1), token, now)
        with self._lock:
            if len(self._verified) >= _CACHE_MAX:
                self._verified = {h: v for h, v in self._verified.items() if v.until > tick}
                if len(self._verified) >= _CACHE_MAX:
                    self._verified.clear()
            self._verified[cache_key] = _Verified(principal, expires, tick + CACHE_S)
        return principal

    def _lookup(
        self, prefix: str, token: str, now: dt.datetime
    ) -> tuple[Principal, dt.datetime | None]:
        """Check ``token`` against its row; note the use when the last note is old."""
        with self.jobs.session() as s:
            row = s.get(ApiKeyRow, prefix)
            if row is None or not hmac.compare_digest(
                row.digest, _digest(bytes.fromhex(row.salt), token)
            ):
                raise UnauthenticatedError(
                    "the API key is not known: expected a key that `radcache keys create` "
                    f"made for this service; {_USAGE}"
                )
            info = KeyInfo.of(row)
            state = info.state(now)
            if state != "active":
                when = info.revoked if state == "revoked" else info.expires
                what = "was revoked" if state == "revoked" else "expired"
                raise UnauthenticatedError(
                    f"the API key {prefix} {what} at {when:%Y-%m-%d %H:%M:%S} UTC: expected "
                    "an active key; ask for a new one (`radcache keys create`)"
                )
            if info.last_used is None or (now - info.last_used).total_seconds() >= TOUCH_S:
                row.last_used = now
        return Principal(info.tenant, frozenset(info.scopes), prefix), info.expires

    def recent(self, token: str) -> Principal | None:
        """The principal of ``token`` if it verified less than :data:`CACHE_S` seconds ago
        (and has not expired since), else None; never touches the database, so an event
        loop may call it."""
        cache_key = hashlib.sha256(token.encode()).hexdigest()
        with self._lock:
            hit = self._verified.get(cache_key)
        if hit is None or time.monotonic() >= hit.until:
            return None
        if hit.expires is not None and _now() >= hit.expires:
            return None
        return hit.principal

    def recent_any_active(self) -> bool | None:
        """:meth:`any_active`'s answer if it is less than :data:`CACHE_S` seconds old,
        else None (without touching the database)."""
        with self._lock:
            cached = self._any_active
        return cached[1] if cached is not None and time.monotonic() < cached[0] else None

    def any_active(self) -> bool:
        """Whether any key is active (none: the service is open); reused for up to
        :data:`CACHE_S` seconds."""
        cached = self.recent_any_active()
        if cached is not None:
            return cached
        tick, now = time.monotonic(), _now()
        with self.jobs.session() as s:
            q = (
                select(ApiKeyRow.prefix)
                .where(ApiKeyRow.revoked.is_(None))
                .where(or_(ApiKeyRow.expires.is_(None), ApiKeyRow.expires > now))
                .limit(1)
            )
            found = s.scalar(q) is not None
        with self._lock:
            self._any_active = (tick + CACHE_S, found)
        return found
