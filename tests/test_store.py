"""The Zarr store: round trips, plain-zarr readability, atomic writes, bulk tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from radcache.embeddings import EmbeddingStore, open_store
from radcache.embeddings.errors import (
    AmbiguousReferenceError,
    NotFoundError,
    StoreError,
    StoreMismatchError,
)
from radcache.embeddings.store.files import file_group, forget_study


def _attrs(
    series: str,
    *,
    model: str = "m",
    recipe: str = "r" * 16,
    dim: int = 8,
    n: int = 3,
    part: str = "",
) -> dict:
    return {
        "volume": {
            "study": "st",
            "series": series,
            "part": part,
            "modality": "CT",
            "patient": None,
        },
        "n_slices": n,
        "model": {"name": model, "dim": dim, "weights_hash": "w" * 32},
        "recipe": {"x": 1},
        "recipe_hash": recipe,
        "precision": "fp32",
        "space": f"{model}.{recipe[:8]}",
    }


def _arrays(n: int = 3, dim: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    cls = rng.normal(size=(n, dim)).astype(np.float32)
    return {
        "cls": cls,
        "pooled": cls.mean(0),
        "mean_patch": rng.normal(size=(n, dim)).astype(np.float32),
        "positions": np.arange(n * 3, dtype=np.float64).reshape(n, 3),
        "slice_index": np.arange(n, dtype=np.int32),
        "patch": rng.normal(size=(n, 2, 2, dim)).astype(np.float16),
    }


def _key(i: int) -> str:
    return f"{i:032x}"


def test_round_trip_and_plain_zarr_read(store_path: Path) -> None:
    st = EmbeddingStore(store_path)
    arrays = _arrays()
    info = st.write(_key(1), _attrs("ser1"), arrays)
    assert info.n_slices == 3 and "patch" in info.kinds
    ro = open_store(store_path)
    assert [e.key for e in ro.series()] == [_key(1)]
    for kind in ("cls", "pooled", "patch", "positions"):
        np.testing.assert_array_equal(ro.read("ser1", kind), arrays[kind])  # type: ignore[arg-type]
    # A researcher without radcache: plain zarr
    g = zarr.open_group(str(store_path), mode="r")
    np.testing.assert_array_equal(g[f"entries/{_key(1)}/cls"][:], arrays["cls"])
    assert g[f"entries/{_key(1)}"].attrs["radcache"]["volume"]["series"] == "ser1"
    assert g[f"entries/{_key(1)}/patch"].chunks == (1, 2, 2, 8)  # one chunk per slice
    # …or xarray, with named dimensions
    import xarray as xr

    ds = xr.open_zarr(store_path / "entries" / _key(1), consolidated=False)
    assert ds["patch"].dims == ("slice", "patch_row", "patch_col", "feature")
    np.testing.assert_array_equal(ds["cls"].values, arrays["cls"])


def test_tables_hold_every_series_vector(store_path: Path) -> None:
    st = EmbeddingStore(store_path)
    for i in range(5):
        st.write(_key(i), _attrs(f"ser{i}", n=i + 1), _arrays(n=i + 1, seed=i))
    (space,) = st.spaces()
    t = open_store(store_path).table(space)
    assert t.keys == [_key(i) for i in range(5)]
    assert t.offsets.tolist() == [0, 1, 3, 6, 10, 15]
    for i in range(5):
        a = _arrays(n=i + 1, seed=i)
        np.testing.assert_array_equal(t.pooled[i], a["pooled"])
        np.testing.assert_array_equal(t.slice_cls(i), a["cls"])


def test_crash_mid_write_leaves_nothing_visible(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = EmbeddingStore(store_path)
    st.write(_key(1), _attrs("ok"), _arrays())
    real = zarr.Array.__setitem__
    calls = {"n": 0}

    def failing(self, sel, value):  # fail on the third array write
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(self, sel, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", failing)
    with pytest.raises(OSError, match="disk full"):
        st.write(_key(2), _attrs("broken"), _arrays(seed=2))
    monkeypatch.setattr(zarr.Array, "__setitem__", real)
    ro = open_store(store_path)
    assert [e.series for e in ro.series()] == ["ok"]
    assert ro.get(_key(2)) is None
    assert ro.table(ro.spaces()[0]).keys == [_key(1)]
    # the same key written again replaces the debris
    EmbeddingStore(store_path).write(_key(2), _attrs("broken"), _arrays(seed=2))
    assert {e.series for e in open_store(store_path).series()} == {"ok", "broken"}


def test_table_row_past_the_commit_point_is_ignored(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = EmbeddingStore(store_path)
    st.write(_key(1), _attrs("a"), _arrays())
    space = st.spaces()[0]
    g = st.root[f"tables/{space}"]
    meta = dict(g.attrs["radcache"])
    # simulate a crash after the rows were appended but before the count was committed
    g["pooled"].resize((5, 8))
    g["pooled"][1:] = 99.0
    assert open_store(store_path).table(space).pooled.shape == (1, 8)
    assert g.attrs["radcache"] == meta


def test_missing_entry_is_reindexed(store_path: Path) -> None:
    st = EmbeddingStore(store_path)
    info = st.write(_key(1), _attrs("a"), _arrays())
    g = st.root[f"tables/{info.space}"]
    meta = dict(g.attrs["radcache"])
    g.attrs["radcache"] = {**meta, "count": 0, "slices": 0}  # as if the table append was lost
    fresh = EmbeddingStore(store_path)
    fresh.ensure_indexed(info)
    assert fresh.table(info.space).keys == [_key(1)]


def test_references_and_errors(store_path: Path) -> None:
    st = EmbeddingStore(store_path)
    st.write(_key(1), _attrs("same", model="m1"), _arrays())
    st.write(_key(2), _attrs("same", model="m2"), _arrays())
    with pytest.raises(AmbiguousReferenceError) as exc:
        st.resolve("same")
    assert _key(1) in str(exc.value) and exc.value.code == "ambiguous-reference"
    assert st.resolve("same", model="m2").key == _key(2)
    assert st.resolve(_key(1)).model == "m1"
    with pytest.raises(NotFoundError):
        st.resolve("nope")
    with pytest.raises(NotFoundError, match="cls_last"):
        st.read(_key(1), "cls_last")
    with pytest.raises(NotFoundError, match="no radcache store"):
        open_store(store_path.parent / "missing.zarr")


def test_pseudonym_secret_is_bound(store_path: Path) -> None:
    st = EmbeddingStore(store_path)
    st.bind_pseudonyms("aaaa")
    st.bind_pseudonyms("aaaa")
    with pytest.raises(StoreMismatchError, match="another pseudonym secret"):
        EmbeddingStore(store_path).bind_pseudonyms("bbbb")


def test_fsspec_url_store() -> None:
    url = "memory://radcache-test-store"
    st = EmbeddingStore(url)
    st.write(_key(7), _attrs("mem"), _arrays())
    again = EmbeddingStore(url, mode="r")
    np.testing.assert_array_equal(again.read("mem", "pooled"), _arrays()["pooled"])


def test_file_digests_are_remembered_and_committed_last(store_path: Path) -> None:
    st = EmbeddingStore(store_path)
    record = {
        "study": "s",
        "series": "x",
        "part": "",
        "modality": "CT",
        "photometric": "MONOCHROME2",
        "n_files": 2,
        "n_slices": 2,
        "warnings": [],
    }
    st.remember_files(_key(9), [_key(1), _key(2), _key(1)], record)
    again = open_store(store_path)
    assert dict(again.file_index()) == {_key(1): _key(9), _key(2): _key(9)}
    names = {"study": "s", "series": "x", "part": "", "patient": None}
    first = file_group([_key(2), _key(1)])
    assert again.volume_record(_key(9)) == {**record, "groups": {first: names}}
    assert again.volume_record(_key(8)) is None
    # rows past the committed count (an interrupted append) are not believed
    g = st.root["files"]
    g["digest"].resize((5, 2))
    g["digest"][2:] = 7
    assert len(open_store(store_path).file_index()) == 2


def test_each_set_of_files_of_a_volume_keeps_its_own_names(store_path: Path) -> None:
    """Files of another study with the same pixels make the same volume under other names;
    deleting one study drops its names and leaves the other's."""
    st = EmbeddingStore(store_path)
    record = {"modality": "CT", "photometric": "MONOCHROME2", "n_files": 2, "n_slices": 2}
    mine = {"study": "s", "series": "x", "part": "", "patient": None}
    other = {"study": "t", "series": "y", "part": "", "patient": "p"}
    st.remember_files(_key(9), [_key(1), _key(2)], {**record, **mine})
    st.remember_files(_key(9), [_key(3), _key(4)], {**record, **other})
    rec = open_store(store_path).volume_record(_key(9))
    assert rec is not None and rec["study"] == "s"  # the first names stay the record's own
    assert rec["groups"] == {
        file_group([_key(1), _key(2)]): mine,
        file_group([_key(4), _key(3)]): other,
    }
    with st._writing():
        forget_study(st.root, {"content_hash": _key(9)}, "s", other)
    kept = open_store(store_path).volume_record(_key(9))
    assert kept is not None and (kept["study"], kept["patient"]) == ("t", "p")
    assert list(kept["groups"].values()) == [other]


def test_a_file_of_two_volumes_is_never_recognised(store_path: Path) -> None:
    from radcache.embeddings.store import SHARED_FILE

    st = EmbeddingStore(store_path)
    record = {
        "study": "s",
        "series": "x",
        "part": "stack=1",
        "modality": "MR",
        "photometric": "MONOCHROME2",
        "n_files": 1,
        "n_slices": 5,
        "warnings": [],
    }
    st.remember_files(_key(21), [_key(5)], record)
    st.remember_files(_key(21), [_key(5)], record)  # the same volume again: unchanged
    assert open_store(store_path).file_index()[_key(5)] == _key(21)
    st.remember_files(_key(22), [_key(5)], {**record, "part": "stack=2"})
    assert open_store(store_path).file_index()[_key(5)] == SHARED_FILE


def test_background_writes_are_complete_at_commit_and_their_errors_surface(
    store_path: Path,
) -> None:
    st = EmbeddingStore(store_path)
    arrays = _arrays(n=70)
    layout = {name: (a.shape, a.dtype) for name, a in arrays.items()}
    writer = st.begin(_key(1), layout)
    for start in range(0, 70, 32):  # more batches than may be outstanding at once
        writer.put("patch", start, arrays["patch"][start : start + 32], wait=False)
    for name in ("cls", "mean_patch", "positions", "slice_index", "pooled"):
        writer.put(name, 0, arrays[name])
    writer.commit(_attrs("s1", n=70), arrays["pooled"], arrays["cls"])
    np.testing.assert_array_equal(st.read(_key(1), "patch"), arrays["patch"])

    bad = st.begin(_key(2), layout)
    bad.put("patch", 60, arrays["patch"][:32], wait=False)  # rows 60:92 of 70: fails
    with pytest.raises(StoreError, match=r"rows 60:92 .* do not fit array 'patch'"):
        bad.commit(_attrs("s2", n=70), arrays["pooled"], arrays["cls"])
    assert st.get(_key(2)) is None  # nothing visible


def test_process_tuning_reuses_memory_and_freezes_the_collector() -> None:
    import subprocess
    import sys

    code = (
        "import gc; from radcache.embeddings.tuning import reuse_memory, settle; "
        "import torch; print(reuse_memory(), reuse_memory()); settle(); "
        "print(gc.get_freeze_count() > 100000)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["True", "True", "True"]  # glibc here; torch alone is >100k objects
