"""Compressed pixel data decoded in worker processes: the same volumes as in the loading
thread, the same errors naming the same files, and a worker that dies fails one file
without taking the process with it."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless

from radcache.embeddings import Pseudonymizer, scan
from radcache.embeddings.errors import DecodeError, InputError
from radcache.embeddings.ingest import _decode_pool, use_decode_workers
from radcache.embeddings.ingest._dicom_decode import decode_file
from radcache.embeddings.settings import Settings
from tests.dicomgen import encoder_available, phantom, write_series

pytestmark = pytest.mark.skipif(
    not encoder_available(JPEG2000Lossless), reason="no JPEG 2000 encoder to write the series"
)


@pytest.fixture
def pool() -> Iterator[_decode_pool.DecodePool]:
    use_decode_workers(2)
    got = _decode_pool.shared_pool()
    assert got is not None and got.workers == 2
    try:
        yield got
    finally:
        use_decode_workers(0)
    assert _decode_pool.shared_pool() is None


@pytest.fixture(scope="module")
def j2k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = (phantom(9, 48, 40, seed=21) % 3000).astype(np.int16)
    return write_series(
        tmp_path_factory.mktemp("j2k"), raw, transfer_syntax=JPEG2000Lossless
    ).directory


def _load(directory: Path, pseudo: Pseudonymizer) -> tuple[np.ndarray | None, list[InputError]]:
    found = scan([directory], pseudo)
    assert len(found.candidates) == 1 and not found.errors
    try:
        return found.candidates[0].load().voxels, []
    except InputError as exc:
        return None, [exc]


def test_a_series_decoded_by_the_pool_equals_one_decoded_in_the_thread(
    j2k: Path, tmp_path: Path, pseudo: Pseudonymizer, pool: _decode_pool.DecodePool
) -> None:
    native = write_series(tmp_path / "native", phantom(5, 20, 24, seed=22)).directory
    with_pool = [_load(d, pseudo)[0] for d in (j2k, native)]
    use_decode_workers(0)
    without = [_load(d, pseudo)[0] for d in (j2k, native)]
    for a, b in zip(with_pool, without, strict=True):
        assert a is not None and b is not None
        np.testing.assert_array_equal(a, b)


def test_a_corrupt_frame_fails_its_file_as_in_the_thread(
    j2k: Path, tmp_path: Path, pseudo: Pseudonymizer, pool: _decode_pool.DecodePool
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    files = sorted(j2k.iterdir())
    for f in files:
        (bad / f.name).write_bytes(f.read_bytes())
    victim = bad / files[4].name
    ds = pydicom.dcmread(victim)
    frame = bytearray(ds.PixelData)
    frame[-200:-8] = os.urandom(192)  # the end of the code stream, inside the fragment
    frame[40:140] = b"\xff" * 100
    ds.PixelData = bytes(frame)
    ds.save_as(victim)
    _, in_pool = _load(bad, pseudo)
    use_decode_workers(0)
    _, in_thread = _load(bad, pseudo)
    assert len(in_pool) == len(in_thread) == 1
    assert isinstance(in_pool[0], DecodeError), in_pool[0]
    assert in_pool[0].path == in_thread[0].path and victim.name in str(in_pool[0].path)
    assert in_pool[0].code == in_thread[0].code
    # The decoders' own words name objects by address, which differ between processes.
    same = [re.sub(r"0x[0-9a-f]+", "0x…", e.message) for e in (in_pool[0], in_thread[0])]
    assert same[0] == same[1]


class _Crash:
    """Arguments whose unpickling ends the worker, as a decoder's native crash does."""

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return (os._exit, (3,))


def test_a_worker_that_dies_fails_one_file_and_the_pool_goes_on(
    j2k: Path, pseudo: Pseudonymizer, pool: _decode_pool.DecodePool
) -> None:
    first = sorted(j2k.iterdir())[0]
    ds = pydicom.dcmread(first)
    expected = decode_file(ds, first.name)
    # A file in flight when another file's decoder kills the pool is tried again.
    executor = pool._pool()
    broken = executor.submit(os._exit, 3)
    job = _decode_pool.DecodeJob(ds, first.name, broken, executor)
    np.testing.assert_array_equal(pool.result(job), expected)
    # The file that kills its worker again fails alone, named.
    with pytest.raises(DecodeError, match="the decoder crashed") as caught:
        pool.result(pool.submit(_Crash(), "IM0042"))  # type: ignore[arg-type]
    assert caught.value.path == "IM0042"
    voxels, errors = _load(j2k, pseudo)  # the next series: a new pool, every file decoded
    assert voxels is not None and not errors and voxels.shape == (9, 48, 40)


def test_the_pool_is_sized_by_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().decode_workers is None  # one per core, at most 16
    assert 1 <= _decode_pool.auto_workers() <= 16
    monkeypatch.setenv("RADCACHE_DECODE_WORKERS", "0")
    assert Settings().decode_workers == 0
    use_decode_workers(None)
    got = _decode_pool.shared_pool()
    assert got is not None and got.workers == _decode_pool.auto_workers()
    use_decode_workers(0)
    assert _decode_pool.shared_pool() is None
