"""The entry catalog in the job database, on SQLite and PostgreSQL: pages by cursor, lookups,
following the store's tables (appends, tombstones, compaction), rebuilding from the store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from radcache.embeddings import EmbeddingStore
from radcache.embeddings.errors import AmbiguousReferenceError, InvalidFieldError, NotFoundError
from radcache.service.entry_catalog import CatalogRef, EntryCatalog
from radcache.service.jobs import JobStore
from tests.conftest import pg_database
from tests.test_index import _entry, _key, _vectors


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
    else:
        yield from pg_database("radcache_catalog")


@pytest.fixture
def jobs(db: str) -> Iterator[JobStore]:
    js = JobStore(db)
    yield js
    js.close()


def _put(st: EmbeddingStore, i: int, study: str | None = None, series: str | None = None) -> str:
    attrs = _entry(i, 2)
    attrs["volume"] = {
        **attrs["volume"],
        "study": study or attrs["volume"]["study"],
        "series": series or attrs["volume"]["series"],
    }
    st.write(_key(i), attrs, _vectors(i, 2))
    return _key(i)


def _names(pages: list[list[tuple[str, list]]]) -> list[str]:
    return [name for page in pages for name, _ in page]


def _all_pages(cat: EntryCatalog, limit: int) -> list[list[tuple[str, list]]]:
    pages, cursor = [], None
    while True:
        page = cat.page(limit, cursor)
        pages.append(page.studies)
        if page.next is None:
            return pages
        cursor = page.next


def test_pages_lookups_and_aliases(jobs: JobStore, store_path: Path) -> None:
    st = EmbeddingStore(store_path)
    for i in range(14):  # study0 … study6, two series each
        _put(st, i)
    st.add_alias(_key(0), {"study": "study9", "series": "seriesX", "part": ""})
    cat = EntryCatalog(jobs)
    assert cat.rebuild(st) == 14
    pages = _all_pages(cat, 3)
    assert [len(p) for p in pages] == [3, 3, 2]
    assert _names(pages) == sorted({f"study{i}" for i in range(7)} | {"study9"})
    study0 = dict(pages[0])["study0"]
    assert [e.key for e in study0] == [_key(0), _key(1)]
    assert [e.key for e in cat.study("study9")] == [_key(0)]  # listed under the alias too
    assert cat.study("study9")[0].study == "study0"  # the entry keeps its own names
    assert cat.study_keys("study0") == [_key(0), _key(1)]
    assert cat.resolve("series3").key == _key(3)
    assert cat.resolve("seriesX").key == _key(0)  # by the alias's series name
    assert cat.resolve(_key(5)).n_slices == 2
    with pytest.raises(NotFoundError):
        cat.resolve("nope")
    _put(st, 20, series="series3")  # another entry with the same series name
    cat.sync(st)
    with pytest.raises(AmbiguousReferenceError, match="2 entries"):
        cat.resolve("series3")
    # offsets still work (older clients), and a cursor this service did not give is refused
    assert [n for n, _ in cat.page(2, offset=3).studies] == ["study2", "study3"]  # study10 2nd
    with pytest.raises(InvalidFieldError, match="cursor"):
        cat.page(3, "bogus!")


def test_unique_prefixes_resolve_and_shared_ones_list_the_candidates(
    jobs: JobStore, store_path: Path
) -> None:
    """A key, series or study is found by its first 4 or more hex characters (any case);
    a prefix two keys share (made so) is ambiguous-reference naming both."""
    st = EmbeddingStore(store_path)
    a, b = "abcd1" + "0" * 27, "abcd2" + "0" * 27
    for i, (key, study, series) in enumerate(((a, "c0ffee01", "5e0f1"), (b, "c0ff9e02", "5e0f2"))):
        attrs = _entry(i, 2)
        attrs["volume"] = {**attrs["volume"], "study": study, "series": series + "a" * 27}
        st.write(key, attrs, _vectors(i, 2))
    cat = EntryCatalog(jobs)
    cat.rebuild(st)
    assert cat.resolve("abcd1").key == a and cat.resolve("ABCD2").key == b
    assert cat.resolve("5e0f2a").key == b  # a prefix of a series name
    assert cat.resolve("5e0f1").key == a
    for shared in ("abcd", "5e0f"):  # two keys, two series
        with pytest.raises(AmbiguousReferenceError) as exc:
            cat.resolve(shared)
        assert exc.value.code == "ambiguous-reference" and a in str(exc.value)
        assert b in str(exc.value)
    for unknown in ("abc", "abce", "abcd3"):  # too short to be a prefix; no such key
        with pytest.raises(NotFoundError):
            cat.resolve(unknown)
    assert cat.expand("study", "c0ffe") == "c0ffee01"
    assert cat.expand("study", "c0ff9e02") == "c0ff9e02"  # whole
    assert cat.expand("key", "abcd2", tenant="other") == "abcd2"  # not that tenant's
    assert cat.expand("series", "not-hex") == "not-hex"
    with pytest.raises(AmbiguousReferenceError, match="c0ff9e02, c0ffee01"):
        cat.expand("study", "C0FF")


def test_a_study_stored_between_pages_is_listed_once(jobs: JobStore, store_path: Path) -> None:
    st = EmbeddingStore(store_path)
    for i in range(0, 12, 2):  # study0 … study5
        _put(st, i)
    cat = EntryCatalog(jobs)
    cat.sync(st)  # a new catalog follows the table from its first row
    first = cat.page(3)
    assert [n for n, _ in first.studies] == ["study0", "study1", "study2"]
    _put(st, 40, study="study10")  # sorts before the cursor: not on a later page
    _put(st, 41, study="study4a")  # after it: on the next page, once
    _put(st, 42, study="study1")  # a new series of a study already listed
    cat.sync(st)
    rest: list[str] = []
    cursor = first.next
    while cursor is not None:
        page = cat.page(3, cursor)
        rest.extend(n for n, _ in page.studies)
        cursor = page.next
    assert rest == ["study3", "study4", "study4a", "study5"]
    assert len(cat.study("study1")) == 2


def test_sync_follows_appends_deletions_and_compaction(jobs: JobStore, store_path: Path) -> None:
    st = EmbeddingStore(store_path)
    for i in range(8):
        _put(st, i)
    cat = EntryCatalog(jobs)
    cat.rebuild(st)
    other = EmbeddingStore(store_path)  # another process writes and deletes
    for i in range(8, 10):
        _put(other, i)
    other.delete_study("study1")  # the library's deletion, without the catalog
    assert cat.sync(st) == 4
    assert cat.study("study1") == [] and len(cat.study("study4")) == 2
    assert cat.sync(st) == 0  # nothing new: nothing read
    other.delete_study("study2")
    _put(other, 2, study="again")  # deleted, then stored again under another study
    other.compact()
    cat.sync(st)  # rows renumbered: reconciled by key
    assert [e.key for e in cat.study("again")] == [_key(2)]
    assert cat.study("study2") == []
    # what a sync made equals what a rebuild makes from the store alone
    with jobs.session() as s:
        synced = sorted(s.execute(sa.select(CatalogRef.study, CatalogRef.key)).all())
    fresh = EntryCatalog(jobs)
    fresh.rebuild(st)
    with jobs.session() as s:
        assert sorted(s.execute(sa.select(CatalogRef.study, CatalogRef.key)).all()) == synced
    # a second process's catalog starts where the database says the first one got to
    late = EntryCatalog(jobs)
    assert late.sync(st) == 0


def test_record_forgets_what_was_deleted_meanwhile(jobs: JobStore, store_path: Path) -> None:
    st = EmbeddingStore(store_path)
    for i in range(4):
        _put(st, i)
    cat = EntryCatalog(jobs)
    assert cat.record(st, [_key(0), _key(1)]) == 2
    st.delete_study("study0")
    assert cat.record(st, [_key(0), _key(1), _key(2)]) == 1  # gone ones are forgotten
    assert cat.get(_key(0)) is None and cat.get(_key(2)) is not None


def test_rebuild_catalog_command_and_upgrade_from_0002(db: str, store_path: Path) -> None:
    from radcache.service.cli import main

    st = EmbeddingStore(store_path)
    for i in range(6):
        _put(st, i)
    engine = sa.create_engine(db)
    try:
        from alembic import command

        from radcache.service.migrations import _config

        with engine.begin() as conn:  # a job database as the previous release left it
            command.upgrade(_config(conn), "0002")  # type: ignore[arg-type]
    finally:
        engine.dispose()
    jobs = JobStore(db)  # upgraded to the catalog's tables
    try:
        cat = EntryCatalog(jobs)
        assert cat.count() == 0 and cat.needs_rebuild(st)
        r = CliRunner().invoke(
            main, ["index", "rebuild-catalog", "--store", str(store_path), "--db", db]
        )
        assert r.exit_code == 0, r.output
        assert "catalogued 6 entries" in r.output
        assert cat.count() == 6 and not cat.needs_rebuild(st)
        assert [n for n, _ in cat.page(10).studies] == ["study0", "study1", "study2"]
    finally:
        jobs.close()


def test_the_index_keeper_compacts_due_tables(jobs: JobStore, store_path: Path) -> None:
    from radcache.embeddings.index import open_index
    from radcache.service.worker import IndexKeeper

    st = EmbeddingStore(store_path)
    for i in range(10):
        _put(st, i)
    cat = EntryCatalog(jobs)
    cat.rebuild(st)
    keeper = IndexKeeper(open_index(st), 60.0, catalog=cat, compact_share=0.5)
    st.delete_study("study0")  # a fifth of the rows, tombstoned just now: not due yet
    keeper.refresh()
    assert keeper.compact() == {} and st.table_meta(st.spaces()[0])["deleted"] == 2
    st.delete_study("study1")
    st.delete_study("study2")
    assert keeper.due(st.table_meta(st.spaces()[0]))  # over half are tombstones
    assert keeper.compact() == {st.spaces()[0]: 6}
    (si,) = keeper.indexes.spaces.values()  # refreshed after compacting
    assert sorted(si.catalog.by_key) == [_key(i) for i in range(6, 10)]
    assert [n for n, _ in cat.page(10).studies] == ["study3", "study4"]
    old = {**st.table_meta(st.spaces()[0]), "deleted": 1, "tombstoned": "2020-01-01T00:00:00"}
    assert IndexKeeper(keeper.indexes, 60.0).due(old)  # the oldest tombstone is an hour old


def test_processes_recording_the_same_entries_at_once_agree(db: str, store_path: Path) -> None:
    """Workers and replicas write the same entries at the same time (a study sent twice, a
    sync beside a job's finish): no conflict, one row each."""
    from concurrent.futures import ThreadPoolExecutor

    st = EmbeddingStore(store_path)
    keys = [_put(st, i) for i in range(12)]
    stores = [JobStore(db) for _ in range(4)]  # four processes' own connections
    try:

        def record(js: JobStore) -> int:
            cat = EntryCatalog(js)
            return sum(cat.record(st, keys) for _ in range(3)) + cat.sync(st)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(record, stores))
        cat = EntryCatalog(stores[0])
        assert cat.count() == 12
        assert [n for n, _ in cat.page(10).studies] == [f"study{i}" for i in range(6)]
    finally:
        for js in stores:
            js.close()
