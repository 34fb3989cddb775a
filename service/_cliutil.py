"""Helpers every ``radcache`` command shares: settings, the server-extra check, error output."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from radcache.embeddings.errors import RadcacheError
from radcache.embeddings.runtime import reuse_memory
from radcache.embeddings.settings import Settings

__all__ = ["URL", "api_fail", "err", "fail", "need_server", "out", "settings"]

err = Console(stderr=True)
out = Console()


def settings(**overrides: Any) -> Settings:
    """The settings, flags over environment; applies the process-wide memory setting."""
    s = Settings(**{k: v for k, v in overrides.items() if v is not None})
    if s.reuse_memory:
        reuse_memory()
    return s


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
    if as_json:
        click.echo(json.dumps({"series": [], "errors": [exc.to_dict()]}))
    else:
        err.print(
            f"[bold red]error[/] {escape(f'[{exc.code}] {exc}')}", highlight=False, soft_wrap=True
        )
    sys.exit(2)


URL: Callable[[Callable[..., Any]], Callable[..., Any]] = click.option(
    "--url",
    default=None,
    help="A running radcache service. [env RADCACHE_URL; default http://127.0.0.1:8000]",
)


def api_fail(exc: Exception, as_json: bool) -> None:
    code = getattr(exc, "code", "unreachable")
    if as_json:
        click.echo(json.dumps({"error": {"code": code, "message": str(exc)}}))
    else:
        err.print(f"[bold red]error[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    sys.exit(2)
