"""``radcache keys create|list|revoke``: the service's API keys, in its job database.

The token of a new key is printed once, by ``create``; ``list`` shows what a key is (prefix,
tenant, scopes, times, state), never the token or its hash.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table

from radcache.embeddings.errors import RadcacheError

from ._common import err, fail, job_store, out, settings

if TYPE_CHECKING:
    from ..keys import KeyInfo, KeyStore

__all__ = ["keys"]

_DB = click.option(
    "--db", help="Job database (SQLAlchemy URL). [env RADCACHE_DB; default sqlite:///./radcache.db]"
)


@contextlib.contextmanager
def _store(db: str | None) -> Iterator[KeyStore]:
    """The key store of the job database ``db`` (or RADCACHE_DB), closed afterwards."""
    from ..keys import KeyStore

    jobs = job_store(settings(db=db).db)
    try:
        yield KeyStore(jobs)
    finally:
        jobs.close()


def _when(t: dt.datetime | None, never: str = "-") -> str:
    return never if t is None else t.isoformat(timespec="seconds")


def _record(k: KeyInfo) -> dict[str, object]:
    return {
        "prefix": k.prefix,
        "tenant": k.tenant,
        "scopes": list(k.scopes),
        "created": _when(k.created),
        "last_used": k.last_used and _when(k.last_used),
        "expires": k.expires and _when(k.expires),
        "revoked": k.revoked and _when(k.revoked),
        "state": k.state(),
    }


@click.group()
def keys() -> None:
    """API keys of the service: make them, list them, revoke them."""


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant the key acts for, e.g. hospital-a.")
@click.option(
    "--scopes",
    required=True,
    help="Comma-separated: submit, read, search, admin (admin covers the others).",
)
@_DB
@click.option(
    "--expires",
    type=click.FloatRange(0, min_open=True),
    help="Days until the key expires. [default never]",
)
def keys_create(tenant: str, scopes: str, db: str | None, expires: float | None) -> None:
    """Make a key and print its token (once: it is not stored, only its hash)."""
    try:
        with _store(db) as ks:
            token, info = ks.create(tenant, scopes.split(","), expires_days=expires)
    except RadcacheError as exc:
        fail(exc, False)
        return
    click.echo(token)
    until = f", expires {_when(info.expires)}" if info.expires else ""
    err.print(
        escape(f"key {info.prefix} for tenant {info.tenant} ({','.join(info.scopes)}){until}.")
        + "\nThis is the only time the key is shown: keep it now. Clients send it as "
        "`Authorization: Bearer <key>`; radcache commands read it from RADCACHE_API_KEY "
        "or --api-key.",
        highlight=False,
        soft_wrap=True,
    )


@keys.command("list")
@_DB
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_list(db: str | None, as_json: bool) -> None:
    """Every key: prefix, tenant, scopes, times and state (never the key itself)."""
    try:
        with _store(db) as ks:
            found = ks.list()
    except RadcacheError as exc:
        fail(exc, as_json)
        return
    if as_json:
        click.echo(json.dumps([_record(k) for k in found]))
        return
    table = Table(title=f"{len(found)} API keys", title_justify="left")
    for col in ("prefix", "tenant", "scopes", "created", "last used", "expires", "state"):
        table.add_column(col)
    for k in found:
        table.add_row(
            k.prefix,
            k.tenant,
            ",".join(k.scopes),
            _when(k.created),
            _when(k.last_used, "never"),
            _when(k.expires, "never"),
            k.state(),
        )
    out.print(table)


@keys.command("revoke")
@click.argument("prefix")
@_DB
def keys_revoke(prefix: str, db: str | None) -> None:
    """Revoke the key PREFIX (as `radcache keys list` shows it); it stops working within
    about a second, in every process."""
    try:
        with _store(db) as ks:
            info = ks.revoke(prefix)
    except RadcacheError as exc:
        fail(exc, False)
        return
    out.print(
        escape(f"key {info.prefix} (tenant {info.tenant}) revoked at {_when(info.revoked)}"),
        highlight=False,
    )
