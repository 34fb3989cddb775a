"""API keys on SQLite and PostgreSQL: making, verifying, listing, revoking and expiring
them, what the database keeps (never the token), the `radcache keys` commands, and the
clients sending the key (to a real server on loopback)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest
import sqlalchemy as sa
import uvicorn
from click.testing import CliRunner
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from radcache.clients import AsyncRadcacheClient, RadcacheAPIError, RadcacheClient
from radcache.embeddings.errors import (
    ConfigError,
    InvalidFieldError,
    NotFoundError,
    UnauthenticatedError,
)
from radcache.service import keys as keys_module
from radcache.service.cli import main
from radcache.service.jobs import JobStore
from radcache.service.keys import SCOPES, ApiKeyRow, KeyStore, Principal
from tests.conftest import pg_database

TOKEN = re.compile(r"^rc_([0-9a-f]{8})_([A-Za-z0-9_-]{43})$")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One database per backend for the module; each test starts with no keys."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('keys') / 'jobs.db'}"
    else:
        yield from pg_database("radcache_keys")


@pytest.fixture(scope="module")
def shared_jobs(db: str) -> Iterator[JobStore]:
    js = JobStore(db)
    yield js
    js.close()


@pytest.fixture
def jobs(shared_jobs: JobStore) -> JobStore:
    with shared_jobs.session() as s:
        s.execute(sa.delete(ApiKeyRow))
    return shared_jobs


@pytest.fixture
def ks(jobs: JobStore) -> KeyStore:
    return KeyStore(jobs)


def _row(jobs: JobStore, prefix: str) -> ApiKeyRow:
    with jobs.session() as s:
        row = s.get(ApiKeyRow, prefix)
        assert row is not None
        return row


def _set(jobs: JobStore, prefix: str, **fields: object) -> None:
    with jobs.session() as s:
        row = s.get(ApiKeyRow, prefix)
        assert row is not None
        for k, v in fields.items():
            setattr(row, k, v)


def _refused(ks: KeyStore, token: str) -> str:
    """The message of the UnauthenticatedError ``token`` gets; it never quotes the token."""
    with pytest.raises(UnauthenticatedError) as info:
        ks.verify(token)
    message = str(info.value)
    assert not token or token not in message
    if m := TOKEN.match(token):
        assert m.group(2) not in message
    return message


def _refused_within(ks: KeyStore, token: str, seconds: float) -> float:
    """Seconds until ``token`` stops verifying; fails if it still verifies after ``seconds``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            ks.verify(token)
        except UnauthenticatedError:
            return time.monotonic() - t0
        time.sleep(0.02)
    _refused(ks, token)  # one last try, after the deadline
    return time.monotonic() - t0


# --- the key store ---


def test_create_verify_and_list(ks: KeyStore, jobs: JobStore) -> None:
    token, info = ks.create("hospital-a", ["read", "search"])
    m = TOKEN.match(token)
    assert m, "rc_<8 hex>_<token_urlsafe(32)>"
    assert info.prefix == m.group(1) and info.tenant == "hospital-a"
    assert info.scopes == ("read", "search") and info.active()
    assert info.created.tzinfo is not None and info.expires is None and info.revoked is None

    who = ks.verify(token)
    assert who == Principal("hospital-a", frozenset({"read", "search"}), info.prefix)
    assert who.allows("read") and who.allows("search") and not who.allows("submit")
    assert not who.allows("admin")

    other, _ = ks.create("lab.b_2", "admin")  # one comma-joined string is taken too
    admin = ks.verify(other)
    assert all(admin.allows(s) for s in SCOPES)
    listed = ks.list()
    assert [k.prefix for k in listed] == [info.prefix, other[3:11]]
    assert dataclasses.replace(listed[0], last_used=None) == info
    assert all(k.state() == "active" for k in listed)
    assert token not in repr(listed) and m.group(2) not in repr(listed)
    assert _row(jobs, info.prefix).last_used is not None  # the first use is noted


def test_revoke_is_immediate_here_idempotent_and_unknown_prefixes_are_not_found(
    ks: KeyStore,
) -> None:
    token, info = ks.create("t", ["submit"])
    assert ks.verify(token).key == info.prefix  # cached now
    gone = ks.revoke(info.prefix)
    assert gone.revoked is not None and gone.state() == "revoked" and not gone.active()
    msg = _refused(ks, token)  # the revoking process drops its cached answer at once
    assert info.prefix in msg and "revoked" in msg
    again = ks.revoke(info.prefix)
    assert again.revoked == gone.revoked  # already revoked: left as it was
    with pytest.raises(NotFoundError, match="keys list"):
        ks.revoke("0badcafe")
    assert [k.state() for k in ks.list()] == ["revoked"]


def test_revocation_elsewhere_is_seen_within_a_second(db: str, ks: KeyStore) -> None:
    token, info = ks.create("t", ["read"])
    elsewhere = JobStore(db)  # another process's connection pool and cache
    try:
        other = KeyStore(elsewhere)
        assert other.verify(token).tenant == "t"
        ks.revoke(info.prefix)
        assert _refused_within(other, token, 1.1) <= 1.3
    finally:
        elsewhere.close()


def test_expiry(ks: KeyStore, jobs: JobStore, db: str) -> None:
    short, info = ks.create("t", ["read"], expires_days=0.5 / 86400)  # half a second
    assert info.expires is not None and info.expires > info.created
    assert info.active(info.created) and not info.active(info.expires)
    assert info.state(info.expires + dt.timedelta(seconds=1)) == "expired"
    ks.verify(short)
    time.sleep(0.55)
    assert "expired" in _refused(ks, short)  # the cached answer ends with the key
    assert ks.list()[0].state() == "expired"

    # A key whose expiry is moved into the past (by another process) is refused from the row.
    token, info = ks.create("t", ["read"], expires_days=30)
    assert info.expires is not None
    assert 29.9 < (info.expires - info.created).total_seconds() / 86400 < 30.1
    ks.verify(token)
    _set(jobs, info.prefix, expires=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    assert "expired" in _refused(KeyStore(jobs), token)
    for bad in (0, -1.0):
        with pytest.raises(InvalidFieldError, match="positive number of days"):
            ks.create("t", ["read"], expires_days=bad)


def test_unknown_and_malformed_tokens_are_refused_without_quoting_them(
    ks: KeyStore, jobs: JobStore
) -> None:
    token, info = ks.create("t", ["read"])
    wrong_secret = f"rc_{info.prefix}_{secrets.token_urlsafe(32)}"
    unknown = f"rc_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
    for t in (wrong_secret, unknown, token + "x", token[:-1] + ("A" if token[-1] != "A" else "B")):
        assert "not known" in _refused(ks, t)
    for t in ("", "Bearer " + token, token.upper(), "rc_1234567_" + token[12:], "x" * 60):
        assert "malformed" in _refused(ks, t)

    # Unknown tokens are not cached: once a row for it exists, the same token verifies.
    salt = secrets.token_bytes(16)
    m = TOKEN.match(unknown)
    assert m
    with jobs.session() as s:
        s.add(
            ApiKeyRow(
                prefix=m.group(1),
                tenant="late",
                scopes="read",
                salt=salt.hex(),
                digest=keys_module._digest(salt, unknown),
                created=dt.datetime.now(dt.UTC),
            )
        )
    assert ks.verify(unknown).tenant == "late"


def test_the_database_holds_no_token(ks: KeyStore, jobs: JobStore) -> None:
    tokens = [ks.create(f"t{i}", ["read", "submit"], expires_days=1)[0] for i in range(3)]
    ks.verify(tokens[0])
    ks.revoke(tokens[1][3:11])
    with jobs.engine.connect() as c:
        rows = c.execute(sa.text("SELECT * FROM api_keys")).mappings().all()
    assert len(rows) == 3
    digests = set()
    for row in rows:
        assert set(row) == {
            "prefix",
            "tenant",
            "scopes",
            "salt",
            "digest",
            "created",
            "last_used",
            "expires",
            "revoked",
        }
        assert len(row["salt"]) == 32 and len(row["digest"]) == 64
        digests.add(row["digest"])
        for value in row.values():
            for token in tokens:
                secret = TOKEN.match(token).group(2)  # type: ignore[union-attr]
                assert secret not in str(value) and secret[:16] not in str(value)
    assert len(digests) == 3


def test_salts_make_the_same_token_hash_differently() -> None:
    token = f"rc_00000000_{secrets.token_urlsafe(32)}"
    a, b = secrets.token_bytes(16), secrets.token_bytes(16)
    assert keys_module._digest(a, token) != keys_module._digest(b, token)
    assert keys_module._digest(a, token) == keys_module._digest(a, token)


def test_scopes_are_checked(ks: KeyStore) -> None:
    for bad in ([], [""], ["write"], ["read", "Admin"], "read,delete"):
        with pytest.raises(InvalidFieldError) as info:
            ks.create("t", bad)
        assert all(s in str(info.value) for s in SCOPES)
    _, info = ks.create("t", ["admin", "read", "read", " search "])
    assert info.scopes == ("read", "search", "admin")  # known order, once each
    assert ks.list() == [info]


def test_tenants_are_checked(ks: KeyStore) -> None:
    for bad in ("", "Hospital", "-a", ".a", "a b", "a/b", "ä", "a" * 65):
        with pytest.raises(InvalidFieldError, match=re.escape("^[a-z0-9][a-z0-9._-]{0,63}$")):
            ks.create(bad, ["read"])
    for good in ("a", "0", "hosp-1.x_y", "a" * 64):
        assert ks.create(good, ["read"])[1].tenant == good
    assert ks.list()[0].tenant == "a"


def test_last_used_is_written_at_most_once_a_minute(ks: KeyStore, jobs: JobStore) -> None:
    token, info = ks.create("t", ["read"])
    assert _row(jobs, info.prefix).last_used is None
    ks.verify(token)
    first = _row(jobs, info.prefix).last_used
    assert first is not None
    KeyStore(jobs).verify(token)  # no cached answer there: reads the row, writes nothing
    assert _row(jobs, info.prefix).last_used == first
    old = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=61)
    _set(jobs, info.prefix, last_used=old)
    KeyStore(jobs).verify(token)
    later = _row(jobs, info.prefix).last_used  # aware UTC: the column type makes it so
    assert later is not None and later > old + dt.timedelta(seconds=60)
    assert ks.list()[0].last_used == later


def test_any_active(ks: KeyStore, jobs: JobStore) -> None:
    assert not ks.any_active()
    _, info = ks.create("t", ["read"])
    assert ks.any_active()  # making a key here drops the cached answer
    ks.revoke(info.prefix)
    assert not ks.any_active()
    _, short = ks.create("t", ["read"], expires_days=1)
    assert ks.any_active()
    _set(jobs, short.prefix, expires=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    assert KeyStore(jobs).any_active() is False


def test_a_taken_prefix_is_drawn_again(ks: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = iter(["aaaaaaaa", "aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(keys_module, "_new_prefix", lambda: next(drawn))
    a, _ = ks.create("t", ["read"])
    b, _ = ks.create("t", ["read"])
    assert a.startswith("rc_aaaaaaaa_") and b.startswith("rc_bbbbbbbb_")
    assert ks.verify(a).key == "aaaaaaaa" and ks.verify(b).key == "bbbbbbbb"


# --- radcache keys ---


def test_keys_commands(db: str, jobs: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    made = runner.invoke(
        main, ["keys", "create", "--tenant", "site-1", "--scopes", "submit,read", "--db", db]
    )
    assert made.exit_code == 0, made.output
    token = made.stdout.strip()
    assert TOKEN.match(token), made.stdout
    assert "only time the key is shown" in made.stderr
    assert "Authorization: Bearer" in made.stderr and "RADCACHE_API_KEY" in made.stderr
    assert token not in made.stderr
    who = KeyStore(jobs).verify(token)
    assert who.tenant == "site-1" and who.scopes == {"submit", "read"}
    secret = TOKEN.match(token).group(2)  # type: ignore[union-attr]

    monkeypatch.setenv("RADCACHE_DB", db)  # the database from settings, no --db
    listed = runner.invoke(main, ["keys", "list"])
    assert listed.exit_code == 0, listed.output
    assert who.key in listed.output and "site-1" in listed.output and "active" in listed.output
    assert secret not in listed.output and secret[:8] not in listed.output
    as_json = runner.invoke(main, ["keys", "list", "--json"])
    records = json.loads(as_json.stdout)
    assert [r["prefix"] for r in records] == [who.key]
    assert records[0]["scopes"] == ["submit", "read"] and records[0]["state"] == "active"
    assert not {"salt", "digest", "token", "key"} & set(records[0])
    assert secret not in as_json.output

    gone = runner.invoke(main, ["keys", "revoke", str(who.key), "--db", db])
    assert gone.exit_code == 0 and "revoked" in gone.output
    _refused(KeyStore(jobs), token)
    assert json.loads(runner.invoke(main, ["keys", "list", "--json"]).stdout)[0]["state"] == (
        "revoked"
    )

    missing = runner.invoke(main, ["keys", "revoke", "0badcafe"])
    assert missing.exit_code == 2 and "not-found" in missing.stderr
    bad = runner.invoke(main, ["keys", "create", "--tenant", "x", "--scopes", "write"])
    assert bad.exit_code == 2 and "invalid-request" in bad.stderr and "submit" in bad.stderr
    assert len(KeyStore(jobs).list()) == 1


# --- the clients send the key ---


@pytest.fixture(scope="module")
def echo() -> Iterator[tuple[str, list[str | None]]]:
    """A throwaway service on loopback: /v1/jobs answers [] to ``Bearer good-key`` or no
    key, 401 to any other key; every Authorization header it got is in the list."""
    seen: list[str | None] = []
    app = FastAPI()

    @app.get("/v1/jobs")
    def jobs(request: Request) -> JSONResponse:
        auth = request.headers.get("authorization")
        seen.append(auth)
        if auth not in (None, "Bearer good-key"):
            problem = {"code": "unauthenticated", "title": "An API key is needed"}
            return JSONResponse({**problem, "detail": "the API key is not known"}, 401)
        return JSONResponse([])

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    thread.join(10)


def test_clients_send_the_key(
    echo: tuple[str, list[str | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = echo
    with RadcacheClient(url, api_key="good-key") as rc:
        assert rc.jobs() == [] and rc.jobs(3) == []
        assert "good-key" not in repr(rc) and "<set>" in repr(rc)
    assert seen[-2:] == ["Bearer good-key"] * 2

    monkeypatch.setenv("RADCACHE_API_KEY", "good-key")
    with RadcacheClient(url) as rc:
        rc.jobs()
        assert "good-key" not in repr(rc)
    assert seen[-1] == "Bearer good-key"
    with RadcacheClient(url, api_key="") as rc:  # "" sends none, whatever the environment says
        rc.jobs()
        assert repr(rc).endswith("api_key=None)")
    assert seen[-1] is None

    async def run() -> None:
        async with AsyncRadcacheClient(url) as rc:
            assert await rc.jobs() == []
            assert "good-key" not in repr(rc)

    asyncio.run(run())
    assert seen[-1] == "Bearer good-key"


def test_a_refused_key_is_not_in_the_error(echo: tuple[str, list[str | None]]) -> None:
    url, seen = echo
    key = f"rc_12345678_{secrets.token_urlsafe(32)}"
    with RadcacheClient(url, api_key=key, retries=0) as rc, pytest.raises(RadcacheAPIError) as e:
        rc.jobs()
    assert e.value.status == 401 and e.value.code == "unauthenticated"
    assert seen[-1] == f"Bearer {key}"
    assert key not in str(e.value) and key not in repr(e.value)
    with pytest.raises(ConfigError) as bad:
        RadcacheClient(url, api_key="two words")
    assert "two words" not in str(bad.value)
    with (
        RadcacheClient("http://127.0.0.1:9", api_key=key, retries=0) as rc,
        pytest.raises(httpx.TransportError) as down,
    ):
        rc.jobs()
    assert key not in str(down.value)


def test_client_commands_send_the_key(
    echo: tuple[str, list[str | None]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url, seen = echo
    runner = CliRunner()
    r = runner.invoke(main, ["jobs", "--url", url, "--api-key", "good-key", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == [], r.output
    assert seen[-1] == "Bearer good-key"
    monkeypatch.setenv("RADCACHE_API_KEY", "good-key")
    assert runner.invoke(main, ["jobs", "--url", url]).exit_code == 0
    assert seen[-1] == "Bearer good-key"
    refused = runner.invoke(main, ["jobs", "--url", url, "--api-key", "other-key", "--json"])
    assert refused.exit_code == 2 and "unauthenticated" in refused.stdout
    assert "other-key" not in refused.output
    assert seen[-1] == "Bearer other-key"
    for name in ("submit", "jobs", "get", "search", "classify", "backfill"):
        command = main.get_command(click.Context(main), name)
        assert command is not None, name
        assert "--api-key" in [o for p in command.params for o in p.opts], name
