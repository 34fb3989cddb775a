"""``radcache check``: whether a store, its tables, its search indexes, the entry catalog and
the job database agree; ``--repair`` fixes what does not (with no server running).

Exit status: 0 when everything agrees (or a repair fixed it all), 1 when something still
disagrees, 2 on an error (a store or database that cannot be opened, a repair refused
because another process has the store open for writing).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table

from radcache.embeddings.errors import RadcacheError

from ._common import STORE, fail, job_store, need_server, out, settings

if TYPE_CHECKING:
    from radcache.embeddings.consistency import CheckReport

    from ..jobs import JobStore
    from ..settings import ServiceSettings

__all__ = ["check"]


@contextlib.contextmanager
def _job_database(url: str) -> Iterator[JobStore | None]:
    """The job database at ``url``, closed afterwards; None for an SQLite file that does
    not exist (a check creates no database)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        parsed = None  # job_store says what is wrong with it
    sqlite = parsed is not None and parsed.get_backend_name() == "sqlite"
    path = parsed.database if parsed is not None and sqlite else None
    if path and not Path(path).exists():
        yield None
        return
    jobs = job_store(url)
    try:
        yield jobs
    finally:
        jobs.close()


@click.command("check")
@STORE
@click.option(
    "--db",
    help="Job database (SQLAlchemy URL) with the entry catalog and the jobs. [env RADCACHE_DB]",
)
@click.option(
    "--index-dir",
    type=click.Path(path_type=Path),
    help="Where the search indexes are saved. [env RADCACHE_INDEX_DIR; default <store>/indexes]",
)
@click.option(
    "--upload-dir",
    type=click.Path(path_type=Path),
    help="The service's upload folder. [env RADCACHE_UPLOAD_DIR]",
)
@click.option(
    "--repair",
    is_flag=True,
    help="Fix what disagrees (refused while another process has the store open for writing).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def check(
    store: str | None,
    db: str | None,
    index_dir: Path | None,
    upload_dir: Path | None,
    repair: bool,
    as_json: bool,
) -> None:
    """Check that the store, its tables, its search indexes, the entry catalog and the job
    database agree (exit 0; 1 if not). With --repair, fix each kind of disagreement by the
    usual means, with no server, worker or embed running on the store."""
    need_server("check")
    s = settings(store=store, db=db, index_dir=index_dir, upload_dir=upload_dir)
    try:
        report = _run(s, repair)
    except RadcacheError as exc:
        fail(exc, as_json)
        return
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        _render(report)
    sys.exit(0 if report.ok else 1)


def _run(s: ServiceSettings, repair: bool) -> CheckReport:
    """Open the store (for writing only to repair) and the job database, and check."""
    from radcache.embeddings import open_store

    from ..check import check as run_check

    options = {k: v for k, v in s.index_options().items() if k != "directory"}
    st = open_store(s.store, mode="a" if repair else "r", locks=s.store_locks() if repair else None)
    try:
        with _job_database(s.db) as jobs:
            report = run_check(
                st,
                jobs,
                repair=repair,
                upload_dir=s.upload_dir,
                quarantine=s.quarantine_dir,
                max_starts=s.queue_max_retries + 2,
                index_dir=s.index_dir,
                index_options=options,
            )
    finally:
        st.backend.close()  # no longer a writer of the store
    if jobs is None:
        report.skipped.append("catalog and jobs: the job database (--db) does not exist")
    return report


def _render(report: CheckReport) -> None:
    if report.findings:
        table = Table(title="found", title_justify="left")
        for col in ("kind", "where", "count", "what it is"):
            table.add_column(col)
        for f in report.findings:
            table.add_row(f.kind, f.where or "-", str(f.count), f.about)
        out.print(table)
    for r in report.repairs:
        where = f" ({r.where})" if r.where else ""
        out.print(
            f"repaired {r.kind}{escape(where)}: {r.count} {r.action}",
            highlight=False,
            soft_wrap=True,
        )
    for note in report.skipped:
        out.print(f"[dim]not checked: {escape(note)}[/]", highlight=False, soft_wrap=True)
    if report.ok:
        out.print(
            "consistent" + (" after repair" if report.repairs else ""),
            highlight=False,
            soft_wrap=True,
        )
        return
    left = ", ".join(f"{f.kind} {f.count}" for f in report.remaining)
    hint = "" if report.repaired else "; `radcache check --repair` fixes them"
    out.print(f"[bold red]inconsistent[/]: {escape(left)}{hint}", highlight=False, soft_wrap=True)
