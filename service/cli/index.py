"""``radcache index list|info|rebuild|compact|rebuild-catalog``: the FAISS search indexes of a
store, its tables and the entry catalog, worked on directly (no service)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click
from rich.table import Table

from radcache.embeddings.errors import RadcacheError

from ._common import STORE, fail, fit_table, need_server, out, settings

__all__ = ["index"]


@click.group()
def index() -> None:
    """The FAISS search indexes of a store (built and kept by `radcache serve`)."""


def _open(store: str | None, factory: str | None, **kw: Any) -> Any:
    from radcache.embeddings import IndexSet, open_store

    s = settings(store=store)
    opts = s.index_options()
    return IndexSet(
        open_store(s.store, mode="r"), **{**opts, **kw, "factory": factory or opts["factory"]}
    )


def print_spaces(store: str | None, as_json: bool) -> None:
    """Print each space of a store: name, model, modalities, recipe summary, entries."""
    from radcache.embeddings import open_store
    from radcache.embeddings.store.spaces import space_summaries

    try:
        st = open_store(settings(store=store).store, mode="r")
        spaces = space_summaries(st)
    except RadcacheError as exc:
        fail(exc, as_json)
        return
    if as_json:
        click.echo(json.dumps([s.as_dict() for s in spaces], indent=1))
        return
    n = len(spaces)
    table = Table(title=f"{st.url}: {n} space{'' if n == 1 else 's'}", title_justify="left")
    for col in ("space", "model", "modality", "recipe", "entries"):
        table.add_column(col)
    for s in spaces:
        mods = "/".join(s.modalities) or "-"
        table.add_row(s.space, s.model, mods, s.recipe, str(s.entries))
    out.print(fit_table(table, ids=("space",), lesser=("model", "recipe")))


@index.command("list")
@STORE
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def index_list(store: str | None, as_json: bool) -> None:
    """The store's spaces (one index each): model, modalities, recipe summary, entries."""
    need_server("index")
    print_spaces(store, as_json)


@index.command("info")
@STORE
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def index_info(store: str | None, as_json: bool) -> None:
    """Type, size, measured recall and memory of each index (brought up to date first)."""
    need_server("index")
    try:
        idx = _open(store, None)
        idx.load()
        idx.refresh()
        idx.save()
        info = idx.info()
    except RadcacheError as exc:
        fail(exc, as_json)
        return
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    table = Table(title=f"indexes of {idx.store.url} ({idx.directory})", title_justify="left")
    for col in ("space", "level", "type", "vectors", "recall@10", "params", "memory"):
        table.add_column(col)
    for sp in info:
        for lv, li in sp["levels"].items():
            recall = "exact" if li["recall_at_10"] is None else f"{li['recall_at_10']:.3f}"
            table.add_row(
                sp["space"],
                lv,
                li["factory"],
                str(li["vectors"]),
                recall,
                json.dumps(li["params"]) if li["params"] else "-",
                f"{li['memory_bytes'] / 2**20:.1f} MiB",
            )
    out.print(fit_table(table, ids=("space",), lesser=("params", "memory", "recall@10")))


@index.command("rebuild")
@STORE
@click.option("--space", help="Only this space (default: all).")
@click.option(
    "--level",
    "levels",
    multiple=True,
    type=click.Choice(["series", "slice"]),
    help="Levels that take --factory (default: both).",
)
@click.option("--factory", help="FAISS factory string, e.g. Flat, IVF1024,Flat, HNSW32. [auto]")
def index_rebuild(
    store: str | None, space: str | None, levels: Sequence[str], factory: str | None
) -> None:
    """Rebuild indexes from the Zarr store alone."""
    need_server("index")
    try:
        idx = _open(store, None)
        idx.load()
        names = idx.rebuild(space, factory=factory, levels=levels or ("series", "slice"))
    except RadcacheError as exc:
        fail(exc, False)
        return
    for name in names:
        sp = idx.spaces[name].info()
        parts = [
            f"{lv} {li['factory']} ({li['vectors']} vectors)" for lv, li in sp["levels"].items()
        ]
        out.print(f"{name}: {', '.join(parts)} → {idx.path(name)}")


@index.command("compact")
@STORE
@click.option("--space", help="Only this space (default: all).")
def index_compact(store: str | None, space: str | None) -> None:
    """Rewrite the store's tables without their deleted rows (a running service does this
    by itself, within an hour of a deletion)."""
    need_server("index")
    from radcache.embeddings import open_store

    try:
        st = open_store(settings(store=store).store, mode="a")
        removed = st.compact(space)
    except RadcacheError as exc:
        fail(exc, False)
        return
    for name, n in removed.items():
        out.print(f"{name}: {n} deleted rows removed")


@index.command("rebuild-catalog")
@STORE
@click.option("--db", help="Job database (SQLAlchemy URL). [env RADCACHE_DB]")
def index_rebuild_catalog(store: str | None, db: str | None) -> None:
    """Make the entry catalog (in the job database) again from the store alone."""
    need_server("index")
    from radcache.embeddings import open_store

    from ..entry_catalog import EntryCatalog
    from ..jobs import JobStore

    s = settings(store=store, db=db)
    try:
        st = open_store(s.store, mode="r")
        jobs = JobStore(s.db)
        try:
            n = EntryCatalog(jobs).rebuild(st)
        finally:
            jobs.close()
    except RadcacheError as exc:
        fail(exc, False)
        return
    out.print(f"catalogued {n} entries of {st.url} in {s.db}")
