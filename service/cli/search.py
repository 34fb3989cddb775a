"""``radcache search`` (similar cases) and ``radcache classify`` (few-shot labels), against a
running service."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.table import Table

from ._common import API_KEY, URL, api_fail, fit_table, id_width, out, service_access, settings

if TYPE_CHECKING:
    from radcache.clients.schemas import QueryResult, SearchHit

__all__ = ["classify", "search"]


def _label_pairs(values: Sequence[str], what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{v!r}: expected KEY=VALUE", param_hint=what)
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _send(document: bytes, destination: str) -> None:
    """Send ``document`` to ``destination`` (AE@HOST:PORT by C-STORE, or a DICOMweb URL by
    STOW-RS with RADCACHE_KOS_DESTINATION_AUTH); a refusal is a usage error."""
    from radcache.embeddings.errors import RadcacheError
    from radcache.service.dicom.send import deliver

    s = settings()
    auth = s.kos_destination_auth.get_secret_value() if s.kos_destination_auth else None
    try:
        how = deliver(document, destination, auth=auth, calling_ae=s.ae_title)
    except RadcacheError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"sent it by {how}")


@click.command()
@click.argument("files", nargs=-1, type=click.Path(exists=True))
@click.option("--series", help="Search with a cached series (name, series#part, or a prefix).")
@click.option("--study", help="Search with every series of a cached study (name or a prefix).")
@click.option("--entry", help="Search with a cache entry key (or a unique prefix of one).")
@click.option("--slice", "slice_", type=click.IntRange(0), help="One slice of --series/--entry.")
@click.option("-k", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--level", type=click.Choice(["series", "slice"]), help="Default: series.")
@click.option(
    "--group-by-series",
    is_flag=True,
    help="Slice level: one hit per series; a many-slice query gives one table, the series "
    "that match best over its slices.",
)
@click.option(
    "--per-slice", is_flag=True, help="With --group-by-series: one table per query slice."
)
@click.option("--filter-modality", multiple=True, help="Only these modalities.")
@click.option("--body-part", multiple=True, help="Only these body parts.")
@click.option("--description", help="Series description contains this (any case).")
@click.option("--collection", help="Only entries of this collection.")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE a stored label must match.")
@click.option("--exclude-same-patient", is_flag=True, help="Leave out the query's patient.")
@click.option("--include-same-study", is_flag=True, help="Let the query's own study match.")
@click.option("--modality", help="Modality of uploaded NIfTI files, e.g. CT.")
@click.option("--space", help="Index space (radcache index info lists them).")
@URL
@API_KEY
@click.option(
    "--kos",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the hits as a DICOM Key Object Selection document (needs the UID vault).",
)
@click.option(
    "--send-to",
    metavar="AE@HOST:PORT|URL",
    help="With --kos: also send the document there: C-STORE to AE@HOST:PORT (calling as "
    "RADCACHE_AE_TITLE), or STOW-RS to a DICOMweb base URL (RADCACHE_KOS_DESTINATION_AUTH).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def search(
    files: Sequence[str],
    series: str | None,
    study: str | None,
    entry: str | None,
    slice_: int | None,
    k: int,
    level: str | None,
    group_by_series: bool,
    per_slice: bool,
    filter_modality: Sequence[str],
    body_part: Sequence[str],
    description: str | None,
    collection: str | None,
    labels: Sequence[str],
    exclude_same_patient: bool,
    include_same_study: bool,
    modality: str | None,
    space: str | None,
    url: str | None,
    api_key: str | None,
    kos: str | None,
    send_to: str | None,
    as_json: bool,
) -> None:
    """Similar cases from a running service: `radcache search --series ID -k 10`, or
    `radcache search FILE -k 10` (the file is embedded on the fly, not stored); `--kos
    OUT.dcm` writes them as a Key Object Selection document a DICOM viewer shows, and
    `--send-to AE@HOST:PORT` sends it to a PACS by C-STORE (`--send-to URL`: by STOW-RS)."""
    import httpx

    from radcache.clients import RadcacheAPIError, RadcacheClient

    named = [x for x in (series, study, entry) if x]
    if bool(files) + len(named) != 1:
        raise click.UsageError("give FILES, or one of --series, --study or --entry.")
    if kos and files:
        raise click.UsageError("--kos takes a cached query (--series, --study or --entry).")
    if send_to and not kos:
        raise click.UsageError("--send-to sends the --kos document: give --kos OUT.dcm too.")
    fields: dict[str, Any] = {
        "series": series,
        "study": study,
        "entry": entry,
        "slice": slice_,
        "k": k,
        "level": level,
        "group_by": "series" if group_by_series else None,
        "space": space,
        "modality": modality,
        "exclude_same_patient": exclude_same_patient,
        "exclude_same_study": not include_same_study,
        "filters": {
            "modality": list(filter_modality),
            "body_part": list(body_part),
            "description": description,
            "collection": collection,
            "labels": _label_pairs(labels, "--label"),
        },
    }
    try:
        url, key = service_access(url, api_key)
        with RadcacheClient(url, api_key=key) as rc:
            if kos:
                document = rc.search_kos(**fields)
                Path(kos).write_bytes(document)
                click.echo(f"wrote {kos}")
                if send_to:
                    _send(document, send_to)
                return
            found = rc.search(list(files) or None, **fields)
    except (RadcacheAPIError, httpx.HTTPError) as exc:
        api_fail(exc, as_json)
        return
    if as_json:
        click.echo(found.model_dump_json())
        return
    if found.level == "slice" and group_by_series and not per_slice:
        _print_by_series(found.results, k)
        return
    w = id_width(h.series for r in found.results for h in r.hits)
    for r in found.results:
        q = r.query
        ident = q.get("series") or q.get("entry")  # cut as the hits' series are
        name = str(ident)[:w] if ident else q.get("upload", "vector")
        where = f" slice {q['slice']}" if q.get("slice") is not None else ""
        if not r.hits:
            click.echo(f"{name}{where}: no hits; {r.note or 'nothing matched'}")
            continue
        table = Table(title=f"{name}{where} · {found.level} level", title_justify="left")
        for col in ("rank", "score", "series", "slice", "modality", "description", "labels"):
            table.add_column(col)
        for h in r.hits:
            table.add_row(
                str(h.rank),
                f"{h.score:.4f}",
                h.series[:w] + (f"#{h.part}" if h.part else ""),
                "-" if h.slice is None else str(h.slice),
                h.modality or "-",
                (h.series_description or "-")[:28],
                json.dumps(h.labels) if h.labels else "-",
            )
        out.print(fit_table(table, ids=("series",), lesser=("labels", "description")))


@click.command()
@click.argument("queries", nargs=-1, required=True)
@click.option("--label-field", help="Support: every cached entry with this stored label.")
@click.option("--support", multiple=True, help="Support: SERIES=LABEL (repeat).")
@click.option("-k", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--method", type=click.Choice(["knn", "prototype"]), default="knn", show_default=True)
@click.option(
    "--level", type=click.Choice(["series", "slice"]), default="series", show_default=True
)
@URL
@API_KEY
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def classify(
    queries: Sequence[str],
    label_field: str | None,
    support: Sequence[str],
    k: int,
    method: str,
    level: str,
    url: str | None,
    api_key: str | None,
    as_json: bool,
) -> None:
    """Few-shot labels for cached series (QUERIES are series names) from a running service."""
    import httpx

    from radcache.clients import RadcacheAPIError, RadcacheClient

    if bool(label_field) == bool(support):
        raise click.UsageError("give --label-field or --support pairs (one of them).")
    pairs = list(_label_pairs(support, "--support").items()) if support else None
    try:
        url, key = service_access(url, api_key)
        with RadcacheClient(url, api_key=key) as rc:
            predicted = rc.classify(
                list(queries),
                support=pairs,
                label_field=label_field,
                k=k,
                method=method,
                level=level,
            )
    except (RadcacheAPIError, httpx.HTTPError) as exc:
        api_fail(exc, as_json)
        return
    if as_json:
        click.echo(predicted.model_dump_json())
        return
    table = Table(title=f"few-shot {method}, k={k}", title_justify="left")
    for col in ("query", "label", "probabilities", "support"):
        table.add_column(col)
    for p in predicted.predictions:
        probs = ", ".join(f"{c} {v:.3f}" for c, v in sorted(p.probabilities.items()))
        q = p.query.get("series") or p.query.get("entry", "")
        where = f" slice {p.query['slice']}" if p.query.get("slice") is not None else ""
        table.add_row(f"{q}{where}"[:24], p.label or "-", probs, str(p.support))
    out.print(table)


@dataclass
class SeriesMatch:
    """One series found by a many-slice query: ``total`` sums its best score per query
    slice (0 where a slice did not find it), ``hit`` is its best slice pair."""

    hit: SearchHit
    query_slice: int | None
    total: float = 0.0
    found_by: int = 0


def by_series(results: Sequence[QueryResult]) -> list[tuple[QueryResult, int, list[SeriesMatch]]]:
    """Slice-level results pooled per query volume and space: (first result, number of
    query slices, the series ranked by mean best score over the query's slices)."""
    groups: dict[tuple[str, str], list[QueryResult]] = {}
    for r in results:
        q = {k: v for k, v in r.query.items() if k != "slice"}
        groups.setdefault((json.dumps(q, sort_keys=True, default=str), r.space), []).append(r)
    pooled = []
    for rs in groups.values():
        matches: dict[str, SeriesMatch] = {}
        for r in rs:
            best: dict[str, SearchHit] = {}
            for h in r.hits:
                if h.entry not in best or h.score > best[h.entry].score:
                    best[h.entry] = h
            for entry, h in best.items():
                m = matches.setdefault(entry, SeriesMatch(h, r.query.get("slice")))
                m.total += h.score
                m.found_by += 1
                if h.score > m.hit.score:
                    m.hit, m.query_slice = h, r.query.get("slice")
        ranked = sorted(matches.values(), key=lambda m: (-m.total, -m.hit.score, m.hit.entry))
        pooled.append((rs[0], len(rs), ranked))
    return pooled


def _print_by_series(results: Sequence[QueryResult], k: int) -> None:
    """One table per query volume: its ``k`` best series over all its slices."""
    pooled = by_series(results)
    w = id_width(m.hit.series for _, _, ranked in pooled for m in ranked)
    for first, n, ranked in pooled:
        q = first.query
        ident = q.get("series") or q.get("entry")
        name = str(ident)[:w] if ident else q.get("upload", "vector")
        if not ranked:
            click.echo(f"{name}: no hits; {first.note or 'nothing matched'}")
            continue
        table = Table(
            title=f"{name} · best series over its {n} slices (--per-slice: a table per slice)",
            title_justify="left",
        )
        for col in (
            "rank",
            "score",
            "slices found",
            "best pair",
            "series",
            "modality",
            "description",
        ):
            table.add_column(col)
        for rank, m in enumerate(ranked[:k], 1):
            h = m.hit
            table.add_row(
                str(rank),
                f"{m.total / n:.4f}",
                f"{m.found_by}/{n}",
                f"{m.query_slice} → {h.slice} ({h.score:.4f})",
                h.series[:w] + (f"#{h.part}" if h.part else ""),
                h.modality or "-",
                (h.series_description or "-")[:28],
            )
        out.print(fit_table(table, ids=("series",), lesser=("description", "modality")))
