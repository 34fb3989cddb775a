"""Who is calling: an API key on every route but the probes, a scope per operation, and the
tenant the key belongs to.

Routes declare what they need with :data:`Submit`, :data:`Read`, :data:`Search`,
:data:`Admin` or :data:`Metrics` (each a :class:`~.keys.Principal`); the OpenAPI document
shows the bearer scheme and each operation's scope. A key comes as
``Authorization: Bearer <key>``, or as the password of HTTP Basic credentials (what
DICOMweb clients such as Orthanc send).

A service whose database holds no active key is *open*: every request acts for the
default tenant with every scope. That is allowed only where :func:`open_allowed` says so
(bound to loopback, or ``--insecure-open``); elsewhere a request without a valid key is
refused even when no key exists, so revoking the last key never opens a service.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes

from radcache.embeddings.errors import ForbiddenError, UnauthenticatedError
from radcache.embeddings.pseudonyms import DEFAULT_TENANT

from .deps import ResourcesDep
from .keys import SCOPES, Principal
from .settings import ServiceSettings

__all__ = [
    "OPEN",
    "Admin",
    "Metrics",
    "Read",
    "Search",
    "Submit",
    "caller",
    "is_loopback",
    "open_allowed",
]

log = logging.getLogger(__name__)

#: The principal of every request to an open service.
OPEN = Principal(tenant=DEFAULT_TENANT, scopes=frozenset(SCOPES), key=None)

_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="apiKey",
    description="An API key from `radcache keys create`: `Authorization: Bearer rc_…`. "
    "DICOMweb routes also take HTTP Basic credentials with the key as the password.",
)
_HOW = "send `Authorization: Bearer <key>`; an administrator makes keys with `radcache keys create`"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_allowed(settings: ServiceSettings) -> bool:
    """Whether a service without keys may answer without one: bound to loopback, or told
    ``insecure_open``."""
    return settings.insecure_open or is_loopback(settings.host)


def _token(request: Request) -> str | None:
    """The key a request carries (Bearer, or the password of Basic credentials)."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise UnauthenticatedError(
                "the Basic credentials are not base64 of user:password; put the API key as "
                f"the password, or {_HOW}."
            ) from None
        return decoded.partition(":")[2]
    raise UnauthenticatedError(
        f"the Authorization header uses the {scheme[:20]!r} scheme; expected Bearer (or Basic "
        f"with the key as the password): {_HOW}."
    )


async def caller(
    scopes: SecurityScopes,
    request: Request,
    res: ResourcesDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
) -> Principal:
    """The principal of a request, checked against the scopes its operation needs."""
    token = _token(request)
    keys = res.keys
    # Answers verified in the last second come from memory, without a worker thread.
    if token is None:
        if open_allowed(res.settings):
            active = keys.recent_any_active()
            if active is None:
                active = await run_in_threadpool(keys.any_active)
            if not active:
                return OPEN
        raise UnauthenticatedError(f"this operation needs an API key: {_HOW}.")
    principal = keys.recent(token)
    if principal is None:
        principal = await run_in_threadpool(keys.verify, token)
    for scope in scopes.scopes:
        if not principal.allows(scope):
            raise ForbiddenError(
                f"key {principal.key} (scopes: {', '.join(sorted(principal.scopes))}) lacks "
                f"the {scope!r} scope this operation needs; use a key made with "
                f"`radcache keys create --scopes {scope},…`."
            )
    return principal


Submit = Annotated[Principal, Security(caller, scopes=["submit"])]
Read = Annotated[Principal, Security(caller, scopes=["read"])]
Search = Annotated[Principal, Security(caller, scopes=["search"])]
Admin = Annotated[Principal, Security(caller, scopes=["admin"])]
Metrics = Annotated[Principal, Security(caller, scopes=["metrics"])]
