"""Deletion without rewrites: tombstoned table rows, compaction beside the live rows, and
indexes that follow both without ever seeing an empty table."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from radcache.embeddings import EmbeddingStore, open_store
from radcache.embeddings.errors import StoreMismatchError
from radcache.embeddings.index import Filters, open_index
from radcache.embeddings.store.compaction import compact_table
from tests.test_index import _entry, _fill, _key, _vectors

SPACE = "m.wwwwwwww.rrrrrrrr"


def _table_files(store_path: Path) -> bytes:
    """Every value of every array under the space's table folder (decompressed), whatever
    group names it."""
    g = zarr.open_group(str(store_path / "tables" / SPACE), mode="r")
    return b"".join(
        np.asarray(a[...]).tobytes()
        for _, a in sorted(g.members(max_depth=None))
        if isinstance(a, zarr.Array)
    )


def test_deleting_tombstones_rows_and_keeps_the_table_whole(store_path: Path) -> None:
    st = EmbeddingStore(store_path)
    _fill(st, range(8))  # study0..study3, two series each
    before = st.table_meta(SPACE)
    assert st.delete_study("study1") == [_key(2), _key(3)]
    meta = st.table_meta(SPACE)
    assert (meta["count"], meta["deleted"], meta["generation"]) == (8, 2, before["generation"])
    t = st.table(SPACE)
    assert _key(2) not in t.keys and len(t.keys) == 6 and list(t.rows) == [0, 1, 4, 5, 6, 7]
    for i, k in enumerate(t.keys):  # vectors stay with their keys
        np.testing.assert_array_equal(t.slice_cls(i), st.read(k, "cls"))
    assert st.table(SPACE, start=3).keys == [_key(i) for i in range(4, 8)]
    assert st.table(SPACE, rows=[0, 2, 7]).keys == [_key(0), _key(7)]  # tombstoned row left out
    assert st.tombstoned(SPACE, 0, 2) == [_key(2), _key(3)]
    # the entries themselves are gone at once
    assert st.get(_key(2)) is None and not (store_path / "entries" / _key(2)).exists()
    assert st.format == 2
    # the catalog's keys go straight to the rows; the library finds them without one
    assert st.delete_study("study2", keys=[_key(4), _key(5), _key(0)]) == [_key(4), _key(5)]
    assert st.delete_study("study2") == []
    assert sorted(open_store(store_path).table(SPACE).keys) == [_key(i) for i in (0, 1, 6, 7)]


def test_compaction_removes_deleted_vectors_from_disk(store_path: Path) -> None:
    st = EmbeddingStore(store_path)
    _fill(st, range(10))
    gone = st.read(_key(4), "cls")
    st.delete_study("study2")
    assert gone.tobytes() in _table_files(store_path)  # tombstoned, still in the files
    live = st.table(SPACE)
    assert st.compact() == {SPACE: 2}
    assert gone.tobytes() not in _table_files(store_path)
    meta = st.table_meta(SPACE)
    assert (meta["count"], meta["deleted"], meta["generation"]) == (8, 0, 1)
    after = st.table(SPACE)
    assert after.keys == live.keys
    np.testing.assert_array_equal(after.cls, live.cls)
    np.testing.assert_array_equal(after.pooled, live.pooled)
    assert st.compact() == {SPACE: 0}  # nothing left to do
    # readable with plain zarr: the rows live where the table's `data` attribute says
    t = zarr.open_group(str(store_path), mode="r")["tables"][SPACE]
    rows = t[t.attrs["radcache"]["data"]]
    keys = [f"{(int(hi) << 64) | int(lo):032x}" for hi, lo in rows["keys"][:8]]
    assert keys == live.keys
    # and it goes on: appends, deletions and another compaction
    _fill(st, range(10, 12))
    st.delete_study("study0")
    assert st.compact() == {SPACE: 2}
    assert st.table(SPACE).keys == [_key(i) for i in (2, 3, 6, 7, 8, 9, 10, 11)]


def test_compaction_carries_over_what_happened_while_it_copied(store_path: Path) -> None:
    """Rows appended and rows deleted between the copy and the swap are not lost, and no
    deleted row comes back."""
    st = EmbeddingStore(store_path)
    _fill(st, range(10))
    st.delete_study("study0")
    other = EmbeddingStore(store_path)  # another process, working while the copy runs

    @contextlib.contextmanager
    def writing() -> Iterator[None]:
        _fill(other, range(10, 13))  # appended after the copy
        other.delete_study("study2")  # rows 4, 5: copied, then deleted
        other.delete_study("study6")  # row 12: appended, then deleted
        with st._writing():
            yield

    assert compact_table(st.root, SPACE, writing) == 3  # rows 0, 1 and 12 went
    meta = st.table_meta(SPACE)
    assert meta["deleted"] == 2 and meta["count"] == 10  # 4, 5 tombstoned in the new rows
    want = [_key(i) for i in (2, 3, 6, 7, 8, 9, 10, 11)]
    assert open_store(store_path).table(SPACE).keys == want
    assert other.table(SPACE).keys == want  # a process that saw the old rows reads anew
    _fill(other, range(13, 14))
    assert st.table(SPACE).keys == [*want, _key(13)]


def test_a_format_1_store_opens_and_is_upgraded_by_its_first_deletion(store_path: Path) -> None:
    st = EmbeddingStore(store_path)
    _fill(st, range(4))
    for doc in (store_path / "zarr.json", store_path / "tables" / SPACE / "zarr.json"):
        d = json.loads(doc.read_text())  # as radcache wrote it before tombstones existed
        d["attributes"]["radcache"].pop("deleted", None)
        if doc.parent == store_path:
            d["attributes"]["radcache"]["format"] = 1
        doc.write_text(json.dumps(d))
    old = EmbeddingStore(store_path)
    assert old.format == 1 and old.table_meta(SPACE)["deleted"] == 0
    assert len(open_index(old).spaces[SPACE].catalog) == 4
    old.delete_study("study0")
    assert EmbeddingStore(store_path).format == 2
    doc = json.loads((store_path / "zarr.json").read_text())
    doc["attributes"]["radcache"]["format"] = 3
    (store_path / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(StoreMismatchError, match="formats 1, 2"):
        open_store(store_path)


def test_index_never_loses_live_entries_while_studies_are_deleted(store_path: Path) -> None:
    """A refresh running beside deletions and compactions never sees an empty table and
    never drops an entry that was not deleted (the old rewrite showed count=0 meanwhile,
    and a refresh emptied the index)."""
    st = EmbeddingStore(store_path)
    _fill(st, range(40))
    idx = open_index(st)
    deleted: set[str] = set()
    seen: list[set[str]] = []
    stop = threading.Event()
    failures: list[BaseException] = []

    def refresher() -> None:
        reader = EmbeddingStore(store_path, mode="r")
        try:
            while not stop.is_set():
                idx.refresh()
                seen.append(set(idx.spaces[SPACE].catalog.by_key))
                # never fewer live rows than live entries (one study's deletion in flight)
                meta = reader.table_meta(SPACE)
                assert meta["count"] - meta["deleted"] >= 40 - len(deleted) - 2
                assert len(reader.table(SPACE).keys) >= 40 - len(deleted) - 2
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    t = threading.Thread(target=refresher)
    t.start()
    try:
        for s in range(0, 20, 2):
            deleted.update(st.delete_study(f"study{s}"))
            if s % 6 == 4:
                st.compact()
    finally:
        stop.set()
        t.join(60)
    assert not failures, failures
    assert len(seen) > 3
    everything = {_key(i) for i in range(40)}
    for indexed in seen:  # what was never deleted was always indexed
        assert everything - deleted <= indexed
    idx.refresh()
    assert set(idx.spaces[SPACE].catalog.by_key) == everything - deleted
    q = st.read(_key(39), "pooled")
    hits = idx.spaces[SPACE].search("series", q[None], 40, Filters())[0]
    assert {h.record.key for h in hits} == everything - deleted


def test_deleted_then_stored_again_under_another_study_is_found_by_its_new_name(
    store_path: Path,
) -> None:
    st = EmbeddingStore(store_path)
    _fill(st, range(6))
    idx = open_index(st)
    st.delete_study("study1")  # key 2 and 3
    again = _entry(2, 4)
    again["volume"] = {**again["volume"], "study": "newstudy"}
    st.write(_key(2), again, _vectors(2, 4))  # the same content, another study
    idx.refresh()
    si = idx.spaces[SPACE]
    assert si.catalog.record(si.catalog.by_key[_key(2)]).study == "newstudy"
    assert _key(3) not in si.catalog.by_key
    assert idx.study_entries("study1") == [] and idx.study_entries("newstudy") == [_key(2)]
    st.compact()
    idx.refresh()  # reconciled by key after the rows were renumbered
    assert sorted(si.catalog.by_key) == sorted(st.table(SPACE).keys)


def test_compact_command(store_path: Path) -> None:
    from radcache.service.cli import main

    st = EmbeddingStore(store_path)
    _fill(st, range(4))
    st.delete_study("study0")
    r = CliRunner().invoke(main, ["index", "compact", "--store", str(store_path)])
    assert r.exit_code == 0, r.output
    assert f"{SPACE}: 2 deleted rows removed" in r.output
    assert open_store(store_path).table_meta(SPACE)["deleted"] == 0
