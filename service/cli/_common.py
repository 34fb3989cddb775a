"""What every ``radcache`` command shares: settings built from flags over environment, the
server-extra check, error output, and the options several commands declare."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape

from radcache.embeddings.errors import ConfigError, RadcacheError
from radcache.embeddings.tuning import reuse_memory

from ..settings import ServiceSettings

if TYPE_CHECKING:
    from ..jobs import JobStore

__all__ = [
    "API_KEY",
    "STORE",
    "URL",
    "api_fail",
    "encoder_options",
    "err",
    "fail",
    "job_store",
    "need_server",
    "out",
    "service_access",
    "settings",
]

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

err = Console(stderr=True)
out = Console()


def settings(**overrides: Any) -> ServiceSettings:
    """The settings, flags over environment; applies the process-wide memory setting.

    A command calls it once; a flag left out (None) falls back to its ``RADCACHE_*``
    variable.
    """
    s = ServiceSettings(**{k: v for k, v in overrides.items() if v is not None})
    if s.reuse_memory:
        reuse_memory()
    return s


def job_store(url: str) -> JobStore:
    """The job database at ``url`` (migrated to the current schema), or one
    :class:`ConfigError` saying why it cannot be opened."""
    from sqlalchemy.exc import ArgumentError, OperationalError

    from ..jobs import JobStore

    try:
        return JobStore(url)
    except (ArgumentError, OperationalError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise ConfigError(
            f"the job database cannot be opened ({reason}): expected a reachable "
            "SQLAlchemy URL in --db or RADCACHE_DB"
        ) from None


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def need_server(command: str) -> None:
    """Stop with one message when the `server` extra (torch, pydicom, zarr…) is missing."""
    wanted = ("torch", "transformers", "pydicom", "zarr") + (
        ("fastapi", "uvicorn") if command == "serve" else ()
    )
    missing = [m for m in wanted if not _importable(m)]
    if missing:
        err.print(
            "[bold red]error[/] "
            + escape(
                f"[missing-extra] `radcache {command}` needs the server extra (missing: "
                f"{', '.join(missing)}); install it with: pip install 'radcache[server]'"
            ),
            highlight=False,
        )
        sys.exit(2)


def fail(exc: RadcacheError, as_json: bool) -> None:
    """Report a library error (as JSON with --json) and exit with status 2."""
    if as_json:
        click.echo(json.dumps({"series": [], "errors": [exc.to_dict()]}))
    else:
        err.print(
            f"[bold red]error[/] {escape(f'[{exc.code}] {exc}')}", highlight=False, soft_wrap=True
        )
    sys.exit(2)


def api_fail(exc: Exception, as_json: bool) -> None:
    """Report a failed service call (as JSON with --json) and exit with status 2."""
    code = getattr(exc, "code", "unreachable")
    if as_json:
        click.echo(json.dumps({"error": {"code": code, "message": str(exc)}}))
    else:
        err.print(f"[bold red]error[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    sys.exit(2)


URL: Decorator = click.option(
    "--url",
    default=None,
    help="A running radcache service. [env RADCACHE_URL; default http://127.0.0.1:8000]",
)

API_KEY: Decorator = click.option(
    "--api-key",
    default=None,
    help="API key sent to the service (Authorization: Bearer). [env RADCACHE_API_KEY]",
)


def service_access(url: str | None, api_key: str | None) -> tuple[str, str | None]:
    """The service a client command talks to and the key it sends: flags over environment."""
    s = settings(url=url, api_key=api_key)
    return s.url, s.api_key.get_secret_value() if s.api_key else None


STORE: Decorator = click.option(
    "--store", help="Zarr store directory or fsspec URL. [env RADCACHE_STORE]"
)

_DEVICE: Decorator = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where the encoder runs."
)
_PRECISION: Decorator = click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    help="auto: bf16 where fast.",
)


def encoder_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The encoder's options of `embed` and `serve`: --device, --precision."""
    return _DEVICE(_PRECISION(fn))
