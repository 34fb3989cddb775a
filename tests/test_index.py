"""FAISS indexes: exact = brute force, add/delete/rebuild/restart, filters never leak;
saved formats, memory-mapped loads, rebuilds beside searches, replicas sharing a folder."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radcache.embeddings import EmbeddingStore, open_store
from radcache.embeddings.errors import NotFoundError, SearchIndexError
from radcache.embeddings.index import (
    Catalog,
    Filters,
    IndexSet,
    LevelIndex,
    Record,
    SpaceIndex,
    choose_factory,
    folders,
    normalise,
    open_index,
)
from radcache.embeddings.index.level import faiss
from radcache.embeddings.search import Query, Searcher, knn_vote, prototype_probabilities

DIM = 16
MODALITIES = ("CT", "MR", "CR")
PARTS = ("CHEST", "HEAD", "")


def _key(i: int) -> str:
    return f"{i + 1:032x}"


def _entry(i: int, n: int) -> dict[str, Any]:
    return {
        "volume": {
            "study": f"study{i // 2}",
            "series": f"series{i}",
            "part": "",
            "patient": f"patient{i // 4}",
            "modality": MODALITIES[i % 3],
            "body_part": PARTS[i % 3] or None,
            "series_description": f"Axial T{i % 2 + 1} post" if i % 3 else "Chest routine",
        },
        "n_slices": n,
        "volume_slices": n,
        "model": {"name": "m", "dim": DIM, "weights_hash": "w" * 32},
        "recipe": {"x": 1},
        "recipe_hash": "r" * 16,
        "precision": "fp32",
        "space": "m.wwwwwwww.rrrrrrrr",
        "labels": {"dx": ["normal", "nodule"][i % 2]} if i % 5 else {},
    }


def _vectors(i: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    centre = np.random.default_rng(i % 7).normal(size=DIM)  # 7 clusters, like real embeddings
    cls = (centre + 0.5 * rng.normal(size=(n, DIM))).astype(np.float32)
    return {"cls": cls, "pooled": cls.mean(0), "slice_index": np.arange(n, dtype=np.int32)}


def _fill(st_: EmbeddingStore, ids: range) -> None:
    for i in ids:
        st_.write(_key(i), _entry(i, 2 + i % 3), _vectors(i, 2 + i % 3))


def _brute(store: EmbeddingStore, q: np.ndarray, k: int, level: str, keep: Any = None) -> list:
    """Numpy reference: (series, slice) of the top k by cosine, over every stored vector."""
    rows, vecs = [], []
    for e in store.series():
        if keep is not None and not keep(e):
            continue
        if level == "series":
            rows.append((e.series, None))
            vecs.append(store.read(e.key, "pooled")[None])
        else:
            cls = store.read(e.key, "cls")
            rows += [(e.series, s) for s in range(len(cls))]
            vecs.append(cls)
    sims = normalise(np.concatenate(vecs)) @ normalise(q[None])[0]
    order = np.argsort(-sims, kind="stable")[:k]
    return [(rows[i], float(sims[i])) for i in order]


def _got(hits: list) -> list:
    return [((h.record.series, h.slice), h.score) for h in hits]


def _same(got: list, want: list) -> None:
    assert [g[0] for g in got] == [w[0] for w in want]
    np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("level", ["series", "slice"])
def test_exact_search_equals_numpy_brute_force(store_path: Path, level: str) -> None:
    st_ = EmbeddingStore(store_path)
    _fill(st_, range(30))
    idx = open_index(st_)
    (si,) = idx.spaces.values()
    assert si.levels[level].kind == "exact"
    rng = np.random.default_rng(99)
    for _ in range(5):
        q = rng.normal(size=DIM).astype(np.float32)
        (hits,) = si.search(level, q[None], 7, Filters())  # type: ignore[arg-type]
        _same(_got(hits), _brute(st_, q, 7, level))


def test_add_delete_rebuild_restart_leave_results_unchanged(store_path: Path) -> None:
    st_ = EmbeddingStore(store_path)
    _fill(st_, range(20))
    idx = open_index(st_)
    q = np.random.default_rng(5).normal(size=DIM).astype(np.float32)

    def results(index: Any) -> list:
        (si,) = index.spaces.values()
        return [_got(si.search(lv, q[None], 6, Filters())[0]) for lv in ("series", "slice")]

    _fill(st_, range(20, 30))  # embeddings land …
    assert idx.refresh() == [next(iter(idx.spaces))]  # … and are added incrementally
    st_.delete_study("study3")  # series6, series7
    idx.refresh()
    incremental = results(idx)
    for level, hits in zip(("series", "slice"), incremental, strict=True):
        _same(hits, _brute(st_, q, 6, level))
    everything = [h for lv in incremental for h in lv]
    assert not any(series in ("series6", "series7") for (series, _), _ in everything)
    idx.save()
    assert results(open_index(st_)) == incremental  # restart: loaded, verified, unchanged
    idx.rebuild()
    assert results(idx) == incremental  # rebuilt from the store alone


def test_index_follows_another_process_and_rebuilds_a_stale_file(store_path: Path) -> None:
    st_ = EmbeddingStore(store_path)
    _fill(st_, range(6))
    idx = open_index(st_)
    other = EmbeddingStore(store_path)  # another writer appends and deletes
    _fill(other, range(6, 9))
    other.delete_study("study0")
    fresh = open_index(EmbeddingStore(store_path))  # saved file is behind: caught up
    (si,) = fresh.spaces.values()
    assert sorted(si.catalog.by_key) == sorted(_key(i) for i in range(2, 9))
    idx.refresh()
    assert sorted(next(iter(idx.spaces.values())).catalog.by_key) == sorted(si.catalog.by_key)
    # An index file from another store with the same space name is not trusted.
    other_store = EmbeddingStore(store_path.parent / "other.zarr")
    _fill(other_store, range(1))
    stale = open_index(other_store, directory=idx.directory)
    assert list(next(iter(stale.spaces.values())).catalog.by_key) == [_key(0)]


def test_approximate_index_is_chosen_by_size_and_records_recall(store_path: Path) -> None:
    assert choose_factory(10, exact_max=50_000) == "Flat"
    assert choose_factory(1_000_000, exact_max=50_000) == "IVF2048,Flat"
    st_ = EmbeddingStore(store_path)
    _fill(st_, range(120))
    idx = open_index(st_, exact_max=100)
    (si,) = idx.spaces.values()
    for li in si.levels.values():
        info = li.info()
        assert info["kind"] == "approximate" and info["factory"].startswith("IVF")
        assert info["recall_at_10"] >= 0.95 and info["params"]["nprobe"] >= 1
    on_disk = open_index(st_, exact_max=100)  # metadata survives a restart

    def built(index: Any) -> dict:
        levels = next(iter(index.spaces.values())).info()["levels"]
        return {lv: {k: v for k, v in i.items() if k != "mapped"} for lv, i in levels.items()}

    assert built(on_disk) == built(idx)


def test_hnsw_deletions_are_tombstones_never_returned(store_path: Path) -> None:
    st_ = EmbeddingStore(store_path)
    _fill(st_, range(40))
    idx = open_index(st_, factory="HNSW16")
    st_.delete_study("study1")
    idx.refresh()
    (si,) = idx.spaces.values()
    assert si.levels["series"].tombstones == 2  # HNSW cannot remove: tombstoned
    q = st_.read(_key(4), "pooled")
    everything = si.search("series", q[None], 40, Filters())[0]
    assert 30 <= len(everything) <= 38 and {"series2", "series3"}.isdisjoint(
        h.record.series for h in everything
    )


def test_bad_factory_is_a_clear_error(store_path: Path) -> None:
    st_ = EmbeddingStore(store_path)
    _fill(st_, range(3))
    with pytest.raises(SearchIndexError, match="factory string"):
        open_index(st_, factory="NotAnIndex99")


# -- filters and exclusions: property tests on an in-memory space -------------------------
def _space(n: int, factory: str = "Flat") -> SpaceIndex:
    cat = Catalog()
    pooled, cls = [], []
    for i in range(n):
        a = _entry(i, 2 + i % 3)
        a["collections"] = ["teaching"] if i % 4 == 0 else []
        cat.add(Record.from_attrs(_key(i), a))
        v = _vectors(i, a["n_slices"])
        pooled.append(v["pooled"])
        cls.append(v["cls"])
    levels = {
        "series": LevelIndex.build(
            "series", normalise(np.stack(pooled)), np.arange(n), factory=factory
        ),
        "slice": LevelIndex.build(
            "slice", normalise(np.concatenate(cls)), np.arange(cat.next_slice), factory=factory
        ),
    }
    return SpaceIndex("s", {"dim": DIM}, cat, levels)  # type: ignore[arg-type]


SPACE = _space(60)

filters_st = st.builds(
    Filters.make,
    modality=st.lists(st.sampled_from(MODALITIES), max_size=2),
    body_part=st.lists(st.sampled_from(("CHEST", "HEAD")), max_size=1),
    description=st.sampled_from([None, "t1", "AXIAL", "chest", "zzz"]),
    collection=st.sampled_from([None, "teaching"]),
    labels=st.sampled_from([None, {"dx": "nodule"}, {"dx": "normal"}]),
    exclude_studies=st.lists(st.sampled_from([f"study{i}" for i in range(30)]), max_size=6),
    exclude_patients=st.lists(st.sampled_from([f"patient{i}" for i in range(15)]), max_size=3),
)


def _passes(r: Record, f: Filters) -> bool:
    return (
        (not f.modality or (r.modality or "") in f.modality)
        and (not f.body_part or (r.body_part or "").upper() in f.body_part)
        and (not f.description or f.description in (r.description or "").lower())
        and (not f.collection or f.collection in r.collections)
        and all(r.labels.get(k) == v.strip('"') for k, v in f.labels)
        and not (r.studies & f.exclude_studies)
        and r.patient not in f.exclude_patients
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    f=filters_st,
    level=st.sampled_from(["series", "slice"]),
    k=st.integers(1, 25),
    seed=st.integers(0, 10_000),
    group=st.booleans(),
)
def test_filters_and_exclusions_never_leak(
    f: Filters, level: str, k: int, seed: int, group: bool
) -> None:
    q = np.random.default_rng(seed).normal(size=(1, DIM)).astype(np.float32)
    (hits,) = SPACE.search(level, q, k, f, group_by_series=group)  # type: ignore[arg-type]
    allowed = [r for r in SPACE.catalog.records if r is not None and _passes(r, f)]
    assert all(_passes(h.record, f) for h in hits)
    # …and nothing allowed is missed: exact search returns the brute-force top k.
    names = {r.key for r in allowed}
    vecs, rows = [], []
    for o, r in enumerate(SPACE.catalog.records):
        if r is None or r.key not in names:
            continue
        ids = SPACE.ids_of(level, o)  # type: ignore[arg-type]
        vecs.append(SPACE.levels[level].reconstruct(list(ids)))  # type: ignore[index]
        rows += [(r.series, None if level == "series" else s) for s in range(len(ids))]
    if not vecs:
        assert hits == []
        return
    sims = np.concatenate(vecs) @ normalise(q)[0]
    order = np.argsort(-sims, kind="stable")
    if group:
        seen: list = []
        for i in order:
            if rows[i][0] not in [s[0][0] for s in seen]:
                seen.append((rows[i], float(sims[i])))
        want = seen[:k]
    else:
        want = [(rows[i], float(sims[i])) for i in order[:k]]
    _same(_got(hits), want)


# -- few-shot classification -----------------------------------------------------------------
def test_knn_vote_is_the_temperature_softmax_vote() -> None:
    sims = np.array([[0.9, 0.8, 0.1, 0.7]])
    p = knn_vote(sims, ["a", "b", "a", "b"], ["a", "b"], k=3, temperature=0.07)
    w = np.exp(np.array([0.9, 0.8, 0.7]) / 0.07)
    np.testing.assert_allclose(p[0], [w[0] / w.sum(), (w[1] + w[2]) / w.sum()])
    protos = prototype_probabilities(
        np.array([[1.0, 0.0]]),
        np.array([[1.0, 0], [0, 1.0]]),
        ["a", "b"],
        ["a", "b"],
        temperature=1,
    )
    np.testing.assert_allclose(protos[0], np.exp([1, 0]) / np.exp([1, 0]).sum())


def test_classify_from_support_set_and_label_field(store_path: Path) -> None:
    st_ = EmbeddingStore(store_path)
    _fill(st_, range(28))  # 7 clusters: entry i sits in cluster i % 7
    searcher = Searcher(open_index(st_))
    support = [(Query(series=f"series{i}"), f"c{i % 7}") for i in range(14)]
    queries = [Query(series=f"series{i}") for i in range(14, 28)]
    for method in ("knn", "prototype"):
        out = searcher.classify(queries, support=support, k=3, method=method)  # type: ignore[arg-type]
        assert [c.label for c in out] == [f"c{i % 7}" for i in range(14, 28)]
        assert all(abs(sum(c.probabilities.values()) - 1) < 1e-6 for c in out)
    by_field = searcher.classify([Query(series="series21")], label_field="dx", k=5)
    assert set(by_field[0].probabilities) == {"normal", "nodule"}
    # The query's own study never supports it.
    assert all(n["series"] not in ("series20", "series21") for n in by_field[0].neighbours)
    with pytest.raises(NotFoundError):
        searcher.search(Query(series="no-such-series"))


def test_search_by_reference_excludes_own_study_and_optionally_patient(store_path: Path) -> None:
    st_ = EmbeddingStore(store_path)
    _fill(st_, range(16))
    searcher = Searcher(open_index(st_))
    (res,) = searcher.search(Query(series="series5"), k=20)
    assert {h.record.study for h in res.hits}.isdisjoint({"study2"}) and len(res.hits) == 14
    (res,) = searcher.search(Query(series="series5"), k=20, exclude_same_patient=True)
    assert {h.record.patient for h in res.hits}.isdisjoint({"patient1"}) and len(res.hits) == 12
    (kept,) = searcher.search(Query(series="series5"), k=1, exclude_same_study=False)
    assert kept.hits[0].record.series == "series5" and kept.hits[0].score == pytest.approx(1)
    slices = searcher.search(Query(series="series5", slice=1), k=3, group_by_series=True)
    assert len({h.record.series for h in slices[0].hits}) == 3
    assert open_store(store_path).series()  # the store is untouched by searching
    assert all(r.note is None for r in slices)


def test_a_query_without_hits_says_why(store_path: Path) -> None:
    st_ = EmbeddingStore(store_path)
    _fill(st_, range(2))  # one study: series0 and series1
    searcher = Searcher(open_index(st_))
    (own,) = searcher.search(Query(series="series0"))
    assert own.hits == [] and "query's own study" in (own.note or "")
    assert "include_same_study" in own.to_dict()["note"]
    nothing = Filters.make(modality=["XA"])
    (res,) = searcher.search(Query(series="series0"), filters=nothing, exclude_same_study=False)
    assert res.hits == [] and "none of the 2 series" in (res.note or "")
    (res,) = searcher.search(Query(series="series0"), exclude_same_study=False)
    assert res.hits and res.note is None and "note" not in res.to_dict()


# -- saved formats and memory-mapped loads -------------------------------------------------
def _save_format1(si: SpaceIndex, path: Path) -> None:
    """Save ``si`` as format 1 did: the same folders, a JSON document per catalog record."""
    where = path / "v1-1"
    where.mkdir(parents=True)
    for lv, li in si.levels.items():
        faiss.write_index(li.index, str(where / f"{lv}.faiss"))
    rows = [
        json.dumps({**{k: getattr(r, k) for k in Record.__dataclass_fields__}, "labels": r.labels})
        if r is not None
        else ""
        for r in si.catalog.records
    ]
    np.savez(
        where / "catalog.npz",
        catalog=np.frombuffer("\n".join(rows).encode(), np.uint8),
        slice_start=np.asarray(si.catalog.slice_start, np.int64),
        next_slice=np.asarray(si.catalog.next_slice, np.int64),
    )
    levels = {
        lv: {k: v for k, v in li.info().items() if k not in ("memory_bytes", "mapped")}
        for lv, li in si.levels.items()
    }
    head = {"format": 1, "space": si.space, **si.meta, "levels": levels}
    (where / "meta.json").write_text(json.dumps(head))
    (path / "CURRENT").write_text("v1-1")


def _answers(si: SpaceIndex) -> list:
    """Hits of a few queries at both levels, unfiltered and filtered."""
    queries = np.random.default_rng(11).normal(size=(3, DIM)).astype(np.float32)
    f = Filters.make(collection="teaching", exclude_studies=["study2"])
    return [
        _got(hits)
        for lv in ("series", "slice")
        for filters in (Filters(), Filters.make(modality=["CT", "MR"]), f)
        for hits in si.search(lv, queries, 5, filters)  # type: ignore[arg-type]
    ]


def test_format_1_and_format_2_load_the_same_catalog_and_answers(tmp_path: Path) -> None:
    si = _space(24)
    si.meta.update(generation=0, rows=24)
    rec = si.catalog.record(0)  # an alias, selected slices, labels and an awkward description
    si.catalog.update(
        dataclasses.replace(
            rec,
            refs=(*rec.refs, ("studyX", "seriesX", "p2")),
            slice_index=(5, 9),
            description="Ünïcode\x00\n desc",
            labels={"dx": "nodule", "score": [1, 2.5, None]},
        )
    )
    si.remove([_key(3)])  # a tombstone
    _save_format1(si, tmp_path / "old")
    new_path = si.save(tmp_path / "new")
    assert json.loads((new_path / "meta.json").read_text())["format"] == 2
    for path in (tmp_path / "old", tmp_path / "new"):
        got = SpaceIndex.load(path)
        assert got.catalog.records == si.catalog.records
        assert got.catalog.by_key == si.catalog.by_key
        assert got.catalog.slice_start == si.catalog.slice_start
        assert got.catalog.ordinals("series", "seriesX#p2") == [0]
        assert np.array_equal(got.catalog.live("slice"), si.catalog.live("slice"))
        assert _answers(got) == _answers(si)
    head = json.loads((new_path / "meta.json").read_text())
    (new_path / "meta.json").write_text(json.dumps({**head, "format": 99}))
    with pytest.raises(SearchIndexError, match="format 99"):
        SpaceIndex.load(tmp_path / "new")


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW16"])
def test_memory_mapped_load_answers_like_a_normal_load(tmp_path: Path, factory: str) -> None:
    path = tmp_path / "space"
    _space(40, factory).save(path)
    on_disk = {f.name: f.read_bytes() for f in (path / folders.current(path)).iterdir()}
    mapped, read = SpaceIndex.load(path), SpaceIndex.load(path, mmap=False)
    assert all(li.mapped for li in mapped.levels.values())
    assert not any(li.mapped for li in read.levels.values())
    assert _answers(mapped) == _answers(read)
    # A change copies mapped data into memory first; the saved files stay as they were.
    extra = Record.from_attrs(_key(100), _entry(100, 3))
    vecs = _vectors(100, 3)
    for si in (mapped, read):
        si.remove([_key(1), _key(2)])
        si.add([extra], vecs["pooled"][None], vecs["cls"])
    assert not any(li.mapped for li in mapped.levels.values())
    assert _answers(mapped) == _answers(read)
    assert {f.name: f.read_bytes() for f in (path / folders.current(path)).iterdir()} == on_disk
    # Unchanged, a mapped index is saved whole, even once the folder it maps is deleted.
    again = SpaceIndex.load(path)
    shutil.rmtree(path)
    again.save(tmp_path / "copy")
    assert _answers(SpaceIndex.load(tmp_path / "copy", mmap=False)) == _answers(again)


# -- rebuilds beside the serving index -------------------------------------------------------
T = TypeVar("T")


class _Paused(IndexSet):
    """A real index set whose builds, once built, wait for the test before they swap in."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.built, self.go = threading.Event(), threading.Event()
        self.go.set()

    def _assemble(self, *args: Any, **kwargs: Any) -> SpaceIndex:
        si = super()._assemble(*args, **kwargs)
        self.built.set()
        assert self.go.wait(60)
        return si


def _returns(fn: Callable[[], T]) -> T:
    """``fn()`` run on a thread, which must come back (not wait for the paused build)."""
    out: list[T] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(60)
    assert out, "it waited for the build"
    return out[0]


def test_rebuilds_run_beside_searches_and_keep_the_writes_made_meanwhile(
    store_path: Path,
) -> None:
    st_ = EmbeddingStore(store_path)
    _fill(st_, range(16))
    idx = _Paused(st_, exact_max=20)
    idx.load()
    idx.refresh()
    (space,) = idx.spaces
    old = idx.spaces[space]
    searcher = Searcher(idx)

    def search() -> list:
        return _got(searcher.search(Query(series="series5"), k=5)[0].hits)

    before = search()
    idx.go.clear()
    idx.built.clear()
    rebuild = threading.Thread(target=idx.rebuild, daemon=True)
    rebuild.start()
    assert idx.built.wait(60)  # built; the swap waits for the test
    assert _returns(search) == before  # answered by the old index meanwhile
    _fill(st_, range(16, 20))  # writes during the rebuild reach the old index …
    st_.delete_study("study1")
    st_.annotate(_key(4), labels={"dx": "rare"})
    _returns(idx.refresh)
    _returns(lambda: idx.touch([_key(4)]))
    assert idx.spaces[space] is old and _key(17) in old.catalog.by_key
    idx.go.set()
    rebuild.join(60)
    new = idx.spaces[space]  # … and the new index has them all
    assert new is not old and sorted(new.catalog.by_key) == sorted(e.key for e in st_.series())
    assert new.catalog.record(new.catalog.by_key[_key(4)]).labels["dx"] == "rare"
    q = np.random.default_rng(8).normal(size=DIM).astype(np.float32)
    _same(_got(new.search("series", q[None], 6, Filters())[0]), _brute(st_, q, 6, "series"))

    # A refresh that finds the index outgrown (exact past 20) builds beside it as well.
    idx.go.clear()
    idx.built.clear()
    _fill(st_, range(20, 28))
    refresh = threading.Thread(target=idx.refresh, daemon=True)
    refresh.start()
    assert idx.built.wait(60)
    assert _returns(search) == _got(searcher.search(Query(series="series5"), k=5)[0].hits)
    idx.go.set()
    refresh.join(60)
    grown = idx.spaces[space]
    assert grown is not new and grown.levels["series"].kind == "approximate"
    assert sorted(grown.catalog.by_key) == sorted(e.key for e in st_.series())


# -- replicas sharing one index folder -------------------------------------------------------
def test_replicas_saving_in_turn_never_remove_each_others_current_version(
    store_path: Path,
) -> None:
    st_ = EmbeddingStore(store_path)
    _fill(st_, range(6))
    a, b = (open_index(st_, keep_versions=1, version_grace=0) for _ in range(2))
    (space,) = a.spaces
    path = a.path(space)
    latest: dict[str, Path] = {}
    for i in range(5):
        for name, replica in (("a", a), ("b", b)):
            replica.touch([_key(i)])
            latest[name] = replica.save()[space]
            assert path / folders.current(path) == latest[name]
            assert all(v.is_dir() for v in latest.values())  # neither removed the other's
            assert len([v for v in path.iterdir() if v.name.startswith("v")]) <= 2  # older went
    assert SpaceIndex.load(path).catalog.records == a.spaces[space].catalog.records


def test_concurrent_replicas_and_readers_always_find_a_whole_current_version(
    store_path: Path,
) -> None:
    st_ = EmbeddingStore(store_path)
    _fill(st_, range(6))
    replicas = [open_index(st_, keep_versions=1, version_grace=0) for _ in range(2)]
    (space,) = replicas[0].spaces
    path = replicas[0].path(space)
    errors: list[BaseException] = []
    writing = threading.Barrier(3)
    done = threading.Event()

    def write(replica: IndexSet) -> None:
        try:
            writing.wait()
            for i in range(8):
                replica.touch([_key(i % 6)])
                replica.save()
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        writing.wait()
        loads = 0
        while not done.is_set() or loads < 3:
            try:
                assert len(SpaceIndex.load(path).catalog) == 6
            except BaseException as exc:
                errors.append(exc)
                return
            loads += 1

    writers = [threading.Thread(target=write, args=(r,)) for r in replicas]
    reader = threading.Thread(target=read)
    for t in (*writers, reader):
        t.start()
    for t in writers:
        t.join(120)
    done.set()
    reader.join(120)
    assert errors == []
    versions = [v for v in path.iterdir() if v.name.startswith("v")]
    assert path / folders.current(path) in versions and len(versions) <= 2
    assert not [v for v in path.iterdir() if v.name.endswith((".tmp", ".del"))]
