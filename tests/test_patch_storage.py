"""Patch storage forms (fp16, int8, pooled:N, none): the codec's round trip within its
stated tolerance, what an entry records, which stored form answers which request, and
readers (the segmentation probe, multi-sequence entries) that never see the encoding."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import zarr

from radcache.embeddings import EmbeddingStore, Pipeline, Pseudonymizer
from radcache.embeddings.encode import Encoder, load_encoder
from radcache.embeddings.errors import ConfigError
from radcache.embeddings.patch_forms import covers, parse_storage
from radcache.embeddings.probes import seg_data
from radcache.embeddings.settings import Settings
from radcache.embeddings.store.patch_codec import decode, encode, pool

#: int8 with a per-token scale keeps each token within this cosine of the fp16 token (the
#: worst token measured on the MNI152 template was 0.99995, bench/README.md; heavy-tailed
#: random tokens of dim 64 in the test below stay above it too).
INT8_COSINE = 0.999


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(den, 1e-30)


def test_int8_round_trip_is_within_tolerance_and_keeps_zero_tokens() -> None:
    rng = np.random.default_rng(0)
    grid = rng.standard_t(3, size=(5, 2, 7, 7, 64)).astype(np.float16)  # heavy tails
    grid[0, 0, 0, 0] = 0  # an all-zero token: scale 0, decoded as zeros
    arrays = encode("int8", grid)
    assert arrays["patch"].dtype == np.int8 and arrays["patch_scale"].shape == grid.shape[:-1]
    group = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    for name, values in arrays.items():
        group.create_array(name, data=values)
    back = decode(group, {"patch_storage": "int8"})
    assert back.dtype == np.float16 and back.shape == grid.shape
    assert np.all(back[0, 0, 0, 0] == 0)
    live = np.abs(grid).max(-1) > 0
    assert _cos(back, grid)[live].min() >= INT8_COSINE


def test_pooling_is_area_pooling_also_when_the_grid_is_not_divisible() -> None:
    rng = np.random.default_rng(1)
    grid = rng.normal(size=(3, 16, 16, 8)).astype(np.float16)
    four = pool(grid, 4)
    assert four.shape == (3, 4, 4, 8) and four.dtype == np.float16
    np.testing.assert_allclose(
        four[1, 2, 3], grid[1, 8:12, 12:16].astype(np.float32).mean((0, 1)), atol=1e-3
    )
    odd = rng.normal(size=(2, 2, 7, 5, 8)).astype(np.float32)  # (slice, sequence, h, w, D)
    ref = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(odd).permute(0, 1, 4, 2, 3).reshape(4, 8, 7, 5), 3
    )
    got = pool(odd, 3)
    assert got.shape == (2, 2, 3, 3, 8)
    np.testing.assert_allclose(got.reshape(4, 3, 3, 8), ref.permute(0, 2, 3, 1).numpy(), atol=2e-3)
    assert pool(odd, 9).shape == (2, 2, 7, 5, 8)  # an axis shorter than N is kept


def test_forms_parse_and_rank() -> None:
    assert parse_storage(True) == "fp16" and parse_storage(False) == "none"
    assert parse_storage(" Pooled:4 ") == "pooled:4"
    with pytest.raises(ConfigError, match="pooled:N"):
        parse_storage("int4")
    assert covers("fp16", "int8") and covers("int8", "pooled:8") and covers("pooled:4", "none")
    assert covers("pooled:4", "pooled:2") and not covers("pooled:2", "pooled:4")
    assert not covers("int8", "fp16") and not covers("none", "pooled:1")
    assert Settings(patch_tokens=False).patch_storage == "none"
    assert Settings(patch_tokens=True).patch_storage == "fp16"
    assert Settings(patch_tokens=True, patch_storage="int8").patch_storage == "int8"
    with pytest.raises(ValueError, match="pattern"):
        Settings(patch_storage="int4")


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(2)
    i, j, _ = np.mgrid[0:64, 0:72, 0:6].astype(np.float32)
    img = 100.0 * ((((i - 32) / 28) ** 2 + ((j - 36) / 30) ** 2) <= 1) + rng.normal(0, 8, i.shape)
    mask = ((((i - 30) / 10) ** 2 + ((j - 34) / 12) ** 2) <= 1).astype(np.int16)
    tmp = tmp_path_factory.mktemp("vol")
    nib.save(nib.Nifti1Image(img.astype(np.float32), np.eye(4)), tmp / "img.nii.gz")
    nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp / "mask.nii.gz")
    return tmp


def _embed(
    enc: Encoder, path: str | Path, pseudo: Pseudonymizer, form: str, volume: Path
) -> tuple[str, str]:
    pipe = Pipeline(enc, EmbeddingStore(path), pseudo, patch_storage=form, batch_size=4)
    (r,) = pipe.embed([volume / "img.nii.gz"], modality="MR").series
    return r.entry, r.cache


def test_each_form_is_recorded_and_read_back_as_float16(
    tiny_fp32: Encoder, volume: Path, pseudo: Pseudonymizer, tmp_path: Path
) -> None:
    g, d = tiny_fp32.cfg.grid, tiny_fp32.cfg.dim
    full: np.ndarray | None = None
    for form in ("fp16", "int8", "pooled:2", "none"):
        key, _ = _embed(tiny_fp32, tmp_path / f"{form}.zarr", pseudo, form, volume)
        st = EmbeddingStore(tmp_path / f"{form}.zarr", mode="r")
        info = st.get(key)
        assert info is not None and info.attrs["patch_storage"] == form
        if form == "none":
            assert "patch" not in info.kinds
            continue
        tokens = st.read(key, "patch")
        assert tokens.dtype == np.float16
        if form == "fp16":
            full = tokens
        elif form == "int8":
            assert {"patch", "patch_scale"} <= set(info.kinds) and tokens.shape == full.shape
            assert _cos(tokens, full).min() >= INT8_COSINE
        else:
            assert tokens.shape == (full.shape[0], 2, 2, d) and g % 2 == 0
            np.testing.assert_allclose(tokens, pool(full, 2), atol=1e-2)


@pytest.mark.parametrize("where", ["local", "object"])
def test_a_stored_form_answers_poorer_requests_only(
    tiny_fp32: Encoder, volume: Path, pseudo: Pseudonymizer, tmp_path: Path, where: str
) -> None:
    # A local store stages the new arrays and renames them over the entry; an object store
    # writes them in place.
    path = tmp_path / "s.zarr" if where == "local" else f"memory://{tmp_path.name}/s.zarr"
    key, cache = _embed(tiny_fp32, path, pseudo, "int8", volume)
    assert cache == "miss"
    EmbeddingStore(path).annotate(key, labels={"dx": "a"}, collection="c")
    assert _embed(tiny_fp32, path, pseudo, "pooled:4", volume) == (key, "hit")  # int8 covers it
    assert _embed(tiny_fp32, path, pseudo, "none", volume) == (key, "hit")
    # fp16 asked of an int8 entry: embedded again, the entry replaced under the same key
    assert _embed(tiny_fp32, path, pseudo, "fp16", volume) == (key, "miss")
    st = EmbeddingStore(path, mode="r")
    info = st.get(key)
    assert info is not None and info.attrs["patch_storage"] == "fp16"
    assert "patch_scale" not in info.kinds
    assert info.attrs["labels"] == {"dx": "a"} and info.attrs["collections"] == ["c"]
    assert st.table_meta(info.space)["count"] == 1  # still one row: nothing to search twice
    assert _embed(tiny_fp32, path, pseudo, "int8", volume) == (key, "hit")


def test_the_segmentation_probe_reads_int8_entries_transparently(
    tiny_fp32: Encoder, volume: Path, pseudo: Pseudonymizer, tmp_path: Path
) -> None:
    path = tmp_path / "s.zarr"
    key, _ = _embed(tiny_fp32, path, pseudo, "int8", volume)
    st = EmbeddingStore(path, mode="r")
    data = seg_data(st, {key: volume / "mask.nii.gz"}, classes=["bg", "blob"])
    (vol,) = data.volumes
    assert vol.tokens.dtype == np.float16
    np.testing.assert_array_equal(vol.tokens, st.read(key, "patch"))


def test_multi_sequence_grids_are_kept_in_int8(pseudo: Pseudonymizer, tmp_path: Path) -> None:
    from tests.test_multiseq import MAPPING, mni_study

    mm = load_encoder("mm-dinov2-tiny-random", device="cpu", precision="fp32")
    study = mni_study(tmp_path, stride=24)
    stores = {f: EmbeddingStore(tmp_path / f"{f}.zarr") for f in ("fp16", "int8")}
    grids = {}
    for form, st in stores.items():
        pipe = Pipeline(mm, st, pseudo, patch_storage=form, batch_size=16)
        (res,) = pipe.embed_study(list(study.values()), mapping=MAPPING).series
        grids[form] = st.read(res.entry, "patch")
        assert st.get(res.entry).attrs["patch_storage"] == form  # type: ignore[union-attr]
    assert grids["int8"].shape == grids["fp16"].shape and grids["int8"].ndim == 5
    live = np.abs(grids["fp16"]).max(-1) > 0
    assert _cos(grids["int8"], grids["fp16"])[live].min() >= INT8_COSINE


def test_a_resent_dicom_series_is_answered_by_digest_only_when_its_form_covers(
    tiny_fp32: Encoder, pseudo: Pseudonymizer, tmp_path: Path
) -> None:
    from tests.dicomgen import phantom, write_series

    gen = write_series(tmp_path / "ct", phantom(5, 24, 20))
    path = tmp_path / "s.zarr"
    run = lambda form: Pipeline(  # noqa: E731
        tiny_fp32, EmbeddingStore(path), pseudo, patch_storage=form, batch_size=4
    ).embed([gen.directory])
    (first,) = run("pooled:2").series
    assert [r.cache for r in run("pooled:1").series] == ["hit"]  # from file digests
    before = tiny_fp32.forward_count
    (again,) = run("int8").series  # richer than stored: embedded again, same entry
    assert (again.entry, again.cache) == (first.entry, "miss") and tiny_fp32.forward_count > before
    assert [r.cache for r in run("int8").series] == ["hit"]
