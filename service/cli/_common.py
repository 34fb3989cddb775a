"""What every ``radcache`` command shares: settings built from flags over environment, the
server-extra check, error and warning output, tables fitted to the console without cutting
an identifier, and the options several commands declare."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from radcache.embeddings._device import check_device
from radcache.embeddings.errors import ConfigError, RadcacheError
from radcache.embeddings.tuning import reuse_memory

from ..settings import ServiceSettings

if TYPE_CHECKING:
    from ..jobs import JobStore

__all__ = [
    "API_KEY",
    "DEVICE",
    "PRECISION",
    "SHORT_ID",
    "STORE",
    "URL",
    "api_fail",
    "encoder_options",
    "err",
    "fail",
    "fit_table",
    "id_width",
    "job_store",
    "need_server",
    "out",
    "series_warnings",
    "service_access",
    "settings",
]

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

err = Console(stderr=True)
out = Console()

#: The fewest characters of an id (an entry key, a study or series pseudonym) a table shows;
#: commands and the service take any unique prefix of one back.
SHORT_ID = 12


def id_width(values: Iterable[str]) -> int:
    """How many leading characters tell ``values`` apart: ``SHORT_ID`` or, where two of
    them share that many, one more than they share."""
    width = SHORT_ID
    for a, b in itertools.pairwise(sorted(set(values))):  # neighbours share the most
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        width = max(width, (min(len(a), len(b)) if same is None else same) + 1)
    return width


def settings(**overrides: Any) -> ServiceSettings:
    """The settings, flags over environment; applies the process-wide memory setting.

    A command calls it once; a flag left out (None) falls back to its ``RADCACHE_*``
    variable.
    """
    from pydantic import ValidationError

    try:
        s = ServiceSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:  # one line per setting, never the value given
        said = [
            f"RADCACHE_{'_'.join(map(str, e['loc'])).upper()} (or its flag): "
            + str(e["msg"]).removeprefix("Value error, ")
            for e in exc.errors()
        ]
        raise click.UsageError("invalid settings: " + "; ".join(said)) from None
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


def series_warnings(series: Iterable[Any]) -> None:
    """Print each series' warnings (results of embedding, or of a job) on stderr."""
    for r in series:
        for w in r.warnings:
            err.print(
                f"[yellow]warning[/] series {r.series[:SHORT_ID]}"
                f"{'#' + r.part if r.part else ''}: {escape(w)}",
                highlight=False,
            )


def api_fail(exc: Exception, as_json: bool) -> None:
    """Report a failed service call (as JSON with --json) and exit with status 2."""
    code = getattr(exc, "code", "unreachable")
    if as_json:
        click.echo(json.dumps({"error": {"code": code, "message": str(exc)}}))
    else:
        err.print(f"[bold red]error[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    sys.exit(2)


def fit_table(
    table: Table, ids: Collection[str], lesser: Sequence[str] = (), console: Console = out
) -> Table:
    """``table`` fitted to ``console``'s width without cutting an identifier (the ``ids``
    columns, by header: names and keys people type back) or a header. Identifiers keep
    each value whole on one line; the ``lesser`` columns are left out, first ones first,
    until the rest fits, and the caption says which (``--json`` has every field).
    Identifiers wider than the console on their own wrap onto more lines, never cut."""
    wide = console.options.update_width(1 << 16)
    for col in table.columns:  # a header is never cut either: its column is left out first
        col.min_width = max(col.min_width or 0, len(str(col.header)))
    kept = [c for c in table.columns if c.header in ids]
    for col in kept:
        col.no_wrap = True
        col.min_width = max(
            (Measurement.get(console, wide, v).maximum for v in col.cells), default=1
        )
    dropped: list[str] = []
    for name in lesser:
        if Measurement.get(console, wide, table).minimum <= console.width:
            break
        table.columns = [c for c in table.columns if c.header != name]
        dropped.append(name)
    if dropped:
        table.caption = f"left out to fit {console.width} columns: {', '.join(dropped)}"
        table.caption_justify = "left"
    if Measurement.get(console, wide, table).minimum > console.width:
        for col in kept:  # too narrow even so: wrap them rather than cut them
            col.no_wrap, col.min_width, col.overflow = False, None, "fold"
    return table


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


def _device_name(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """--device: auto, cpu, cuda or cuda:N (whether GPU N exists is checked at load)."""
    try:
        return None if value is None else check_device(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


DEVICE: Decorator = click.option(
    "--device",
    callback=_device_name,
    metavar="auto|cpu|cuda|cuda:N",
    help="Where the encoder runs: auto, cpu, cuda or cuda:N. [env RADCACHE_DEVICE]",
)
PRECISION: Decorator = click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
    help="auto: bf16 on CUDA at compute capability ≥ 8.0, fp16 below; bf16 on CPUs with "
    "native bf16, else fp32. [env RADCACHE_PRECISION]",
)


def encoder_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The encoder's options of `embed`, `serve` and `worker`: --device, --precision."""
    return DEVICE(PRECISION(fn))
