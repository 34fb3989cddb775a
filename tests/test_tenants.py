"""Tenants in the library: pseudonym domains, entries of their own, confined searches."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import numpy as np
import pytest

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer, Query, Searcher
from radcache.embeddings.cache_keys import tenant_content
from radcache.embeddings.encode import Encoder
from radcache.embeddings.errors import NotFoundError
from radcache.embeddings.index import Filters, Record, open_index
from radcache.embeddings.index.catalog import Catalog
from radcache.embeddings.index.catalog_arrays import from_arrays, to_arrays
from radcache.embeddings.probes import features
from tests.conftest import TEST_SECRET
from tests.dicomgen import phantom, write_series


def test_each_tenant_is_a_pseudonym_domain_and_the_default_is_unchanged() -> None:
    base = Pseudonymizer(TEST_SECRET.encode())
    a, b = base.for_tenant("a"), base.for_tenant("b")
    mac = hmac.new(TEST_SECRET.encode(), b"study:1.2.3", hashlib.sha256).hexdigest()[:32]
    assert base.name("study", "1.2.3") == mac  # names made before tenants stay valid
    names = {p.name("study", "1.2.3") for p in (base, a, b)}
    assert len(names) == 3
    assert len({p.file_digest(b"same bytes") for p in (base, a, b)}) == 3
    assert a.fingerprint() == base.fingerprint()  # one secret, one store binding
    assert "a" in repr(a) and TEST_SECRET not in repr(a)
    assert tenant_content("c0ffee", "default") == "c0ffee"
    assert len({tenant_content("c0ffee", t) for t in ("default", "a", "b")}) == 3


def _rec(i: int, tenant: str) -> Record:
    ref = (f"s{i}", f"x{i}", "")
    return Record(f"k{i}", *ref, n_slices=2, refs=(ref,), tenant=tenant)


def test_the_catalog_confines_masks_to_a_tenant_and_keeps_tenants_on_disk() -> None:
    cat = Catalog()
    for i in range(6):
        cat.add(_rec(i, "a" if i % 2 else "b"))
    cat.remove("k3")
    m = cat.mask("series", Filters(tenant="a"))
    assert np.flatnonzero(m).tolist() == [1, 5]
    s = cat.mask("slice", Filters(tenant="b"))
    assert np.flatnonzero(s).tolist() == [0, 1, 4, 5, 8, 9]
    _, nbits, count = cat.allowed("series", Filters(tenant="a", exclude_studies=frozenset({"s5"})))
    assert count == 1 and nbits == 6
    back = from_arrays(to_arrays(cat))
    assert [r.tenant if r else None for r in back.records] == ["b", "a", "b", None, "b", "a"]
    assert back.count("tenant", "a") == 2
    # a catalog of the default tenant alone is written without the column (older files)
    only = Catalog()
    only.add(_rec(0, "default"))
    arrays = to_arrays(only)
    assert b'"tenant"' not in arrays["columns"].tobytes()
    assert from_arrays(arrays).records[0].tenant == "default"  # type: ignore[union-attr]


def test_tenants_get_entries_of_their_own_and_searches_stay_inside(
    tmp_path: Path, tiny: Encoder
) -> None:
    root = tmp_path
    same = write_series(root / "same", phantom(4, 16, 16, seed=3)).directory
    other = write_series(root / "other", phantom(4, 16, 16, seed=4)).directory
    store = EmbeddingStore(root / "s.zarr")
    base = Pipeline(tiny, store, Pseudonymizer(TEST_SECRET.encode()), batch_size=8)
    pa, pb = base.variant(tenant="a"), base.variant(tenant="b")
    (ra,) = pa.embed([same]).series
    (rb,) = pb.embed([same]).series
    (rb2,) = pb.embed([other]).series
    assert rb.cache == "miss"  # a's entry never answers b
    assert ra.entry != rb.entry and ra.study != rb.study and ra.series != rb.series
    assert store.get(ra.entry).attrs["tenant"] == "a"  # type: ignore[union-attr]
    np.testing.assert_array_equal(store.read(ra.entry, "cls"), store.read(rb.entry, "cls"))
    again = pa.embed([same])  # recognised by a's own file digests
    assert again.series[0].entry == ra.entry and again.series[0].cache == "hit"

    searcher = Searcher(open_index(store), base)
    hits = searcher.search(Query(series=ra.series), exclude_same_study=False, tenant="a")
    assert {h.record.key for qh in hits for h in qh.hits} == {ra.entry}
    hits = searcher.search(Query(series=rb.series), exclude_same_study=False, tenant="b")
    assert {h.record.key for qh in hits for h in qh.hits} == {rb.entry, rb2.entry}
    with pytest.raises(NotFoundError):
        searcher.search(Query(series=rb.series), tenant="a")
    with pytest.raises(NotFoundError):
        searcher.search(Query(entry=rb.entry), tenant="a")
    unconfined = searcher.search(Query(series=ra.series), exclude_same_study=False)
    assert len(unconfined[0].hits) == 3  # the library without a tenant sees everything
    up = searcher.search_upload([same], exclude_same_study=False, tenant="b")
    assert {h.record.key for h in up[0].hits} <= {rb.entry, rb2.entry}
    assert up[0].hits[0].record.key == rb.entry
    info = {i["space"]: i for i in searcher.indexes.info("a")}
    (space,) = info.values()
    assert space["entries"] == 1 and space["levels"]["slice"]["vectors"] == 4
    assert searcher.indexes.info("nobody") == []
    mine = features(store, tenant="b")
    assert sorted(r["entry"] for r in mine.rows) == sorted([rb.entry, rb2.entry])
    assert len(features(store)) == 3
    # deleting b's study removes b's entry and its volume record, nothing of a's
    raw = str(store.get(rb.entry).attrs["content_hash"])  # type: ignore[union-attr]
    assert store.volume_record(tenant_content(raw, "b")) is not None
    assert store.delete_study(rb.study, keys=[rb.entry]) == [rb.entry]
    assert store.volume_record(tenant_content(raw, "b")) is None
    assert store.volume_record(tenant_content(raw, "a")) is not None
    assert store.get(ra.entry) is not None
