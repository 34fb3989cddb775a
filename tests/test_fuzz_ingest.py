"""Hypothesis mutates real files and feeds them through ingest as a worker does (``scan``,
then ``Candidate.load`` of each volume): only radcache's documented input errors may come
out, each naming the file and quoting no header value, and no file may hang.

The seeds are real: pydicom's bundled test files (uncompressed, big endian, RLE, JPEG
baseline, JPEG 2000, deflate, multi-frame), nibabel's NIfTI-1/NIfTI-2 test files (plain
and gzipped) and a zip of a small generated DICOM series. A mutation is a byte flip, a
truncation, a splice (bytes inserted, removed or copied from elsewhere in the file) or an
edit of a length or size field (DICOM element lengths, NIfTI dims/datatype/offsets, zip
sizes and offsets) to a boundary value; it applies to the bytes as sent or, for gzip,
deflate and zip, to the content inside (recompressed), so the parsers behind the
compression see it too.

Each example runs under a hard watchdog (the process dies with every thread's traceback
if one file takes ``fuzzing.HANG_S``) and Hypothesis' ``deadline``. Generation is
derandomised, so CI runs the same examples every time; ``RADCACHE_FUZZ_EXAMPLES`` sets
the examples per format (defaults: 1,500 DICOM, 1,000 NIfTI, 600 zip; about 13 s on two
cores).
``bench/fuzz_ingest.py`` runs the same harness for longer.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests import fuzzing


def _settings(default: int) -> settings:
    return settings(
        max_examples=fuzzing.env_examples(default),
        derandomize=True,
        database=None,
        deadline=fuzzing.DEADLINE_MS,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@_settings(1500)
@given(fuzzing.mutated(fuzzing.dicom_seeds()))
def test_mutated_dicom(sample: fuzzing.Sample) -> None:
    fuzzing.check(sample)


@_settings(1000)
@given(fuzzing.mutated(fuzzing.nifti_seeds()))
def test_mutated_nifti(sample: fuzzing.Sample) -> None:
    fuzzing.check(sample)


@_settings(600)
@given(fuzzing.mutated(fuzzing.zip_seeds()))
def test_mutated_zip(sample: fuzzing.Sample) -> None:
    fuzzing.check(sample)


@pytest.mark.parametrize("kind", ["dicom", "nifti", "zip"])
def test_the_seeds_are_read_whole(kind: str) -> None:
    """Unmutated, every seed gives volumes and no error: the fuzzer starts from files the
    readers take (else it would only test the first refusal)."""
    for seed in fuzzing.SEEDS[kind]():
        assert fuzzing.check(fuzzing.Sample(seed.name, seed.data, ())) == [], seed.name


def _edited(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new) :]


def _inserted(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at:]


def _seed(name: str) -> bytes:
    return next(s.data for s in fuzzing.dicom_seeds() if s.name == name)


def _two_transfer_syntaxes() -> bytes:
    data = _seed("CT_small.dcm")
    return _edited(data, data.index(b"1.2.840.10008.1.2.1\0"), b"1.2.840.10008.1.2\\1\0")


def _zip_with_cd_offset(offset: int) -> bytes:
    data = fuzzing.zip_seeds()[0].data
    return _edited(data, data.rindex(b"PK\x05\x06") + 16, offset.to_bytes(4, "little"))


def _zip_with_a_nameless_member() -> bytes:
    """A zip whose one member's name is moved into its extra field (name length 0)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a", _seed("CT_small.dcm"))
    data = buf.getvalue()
    at = data.index(b"PK\x01\x02")
    return _edited(data, at + 28, (0).to_bytes(2, "little") + (1).to_bytes(2, "little"))


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        # pydicom's RLE decoder refuses this segment, and pylibjpeg-rle panics on it (pyo3's
        # PanicException, a BaseException: no `except Exception` caught it)
        ("MR_small_RLE.dcm", _inserted(_seed("MR_small_RLE.dcm"), 1546, b"\0"), "decode-failed"),
        # encapsulated Pixel Data of length 0 reads as None
        ("MR_small_RLE.dcm", _edited(_seed("MR_small_RLE.dcm"), 1512, bytes(4)), "decode-failed"),
        # a Transfer Syntax UID of two values: radcache asked a MultiValue is_compressed
        ("CT_small.dcm", _two_transfer_syntaxes(), "invalid-header"),
        # a central directory offset past the end: zipfile seeks before the start (ValueError)
        ("study.zip", _zip_with_cd_offset(0xFFFF0000), "unsupported-input"),
        # a member without a name: zipfile's own ZipInfo.is_dir() raises IndexError
        ("study.zip", _zip_with_a_nameless_member(), "unsupported-input"),
    ],
    ids=[
        "rle-decoder-panics",
        "empty-pixel-data",
        "two-transfer-syntaxes",
        "zip-offset-before-start",
        "zip-nameless",
    ],
)
def test_what_fuzzing_found(name: str, data: bytes, code: str) -> None:
    errors = fuzzing.check(fuzzing.Sample(name, data, ()))
    assert errors and {e.code for e in errors} == {code}, [str(e) for e in errors]


def test_a_corrupt_jpeg_does_not_abort_the_process() -> None:
    """GDCM's JPEG codec aborted the whole process (an uncaught C++ exception) on this
    file; ingest decodes without GDCM. Checked in a child process, so that a regression
    fails this test instead of ending the test run."""
    code = (
        "from tests import fuzzing\n"
        "data = next(s.data for s in fuzzing.dicom_seeds() if s.name == 'SC_rgb_jpeg_dcmtk.dcm')\n"
        "data = data[:1502] + b'a' + data[1503:1928] + b'\\xae\\xf3\\x83' + data[1928:]\n"
        "print([e.code for e in fuzzing.check(fuzzing.Sample('x.dcm', data, ()))])\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
