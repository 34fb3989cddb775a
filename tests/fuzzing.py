"""Mutation fuzzing of ingest: the seeds (real files), the mutations (Hypothesis
strategies) and the check one mutated file must pass. Used by
``tests/test_fuzz_ingest.py`` (bounded, in CI) and ``bench/fuzz_ingest.py`` (long runs).

A file passes when ``scan`` returns (never raises) and each candidate's ``load`` either
gives a volume or raises an :class:`~radcache.embeddings.errors.InputError`, and every
error names the file, quotes none of the seed's identifying header values and is not a
catch-all wrapped around a programming error of radcache's own code (an ``IndexError``
raised by radcache is a bug even when it is reported as "could not be read").
"""

from __future__ import annotations

import faulthandler
import functools
import gzip
import io
import os
import struct
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from hypothesis import strategies as st
from nibabel.testing import data_path as nibabel_data
from pydicom.data import get_testdata_file

import radcache.embeddings
from radcache.embeddings import Pseudonymizer
from radcache.embeddings.errors import InputError, RadcacheError
from radcache.embeddings.ingest import Limits, scan
from tests.dicomgen import phantom, write_series, zip_bytes

__all__ = [
    "DEADLINE_MS",
    "HANG_S",
    "SEEDS",
    "Sample",
    "Seed",
    "check",
    "dicom_seeds",
    "mutated",
    "nifti_seeds",
    "zip_seeds",
]

#: One file taking this long is a hang: the process dies with every thread's traceback.
HANG_S = 60.0
#: Hypothesis' per-example deadline (a slow file fails, with its shrunk example).
DEADLINE_MS = 5000
# Small enough that a header declaring a huge volume is refused before it is allocated.
LIMITS = Limits(max_voxels=1 << 24, max_decompressed_bytes=1 << 28)
PSEUDO = Pseudonymizer(b"radcache-fuzz-secret-0123456789")
# Raised by a reader's own code, never by a decoder reporting bad data: a bug to fix.
PROGRAMMING_ERRORS = (
    IndexError,
    KeyError,
    TypeError,
    AttributeError,
    NameError,
    AssertionError,
    ZeroDivisionError,
    OverflowError,
    RecursionError,
    MemoryError,
    struct.error,
)
DICOM_FILES = (
    "CT_small.dcm",  # explicit VR little endian
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "MR_small_RLE.dcm",  # RLE lossless
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, RGB
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "image_dfl.dcm",  # deflated explicit VR little endian
    "rtdose.dcm",  # multi-frame, implicit VR
    "SC_rgb_rle_2frame.dcm",  # multi-frame RLE, RGB
)
NIFTI_FILES = ("standard.nii.gz", "resampled_anat_moved.nii", "example_nifti2.nii.gz")
_IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "AccessionNumber",
    "InstitutionName",
    "ReferringPhysicianName",
    "OperatorsName",
    "StudyID",
    "StudyDescription",
    "SeriesDescription",
)
# Element VRs whose length field is 4 bytes in explicit VR (the rest: 2 bytes).
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}

Field = tuple[int, int]  # (offset, size in bytes) of a length or size field


@dataclass(frozen=True)
class Layer:
    """The content inside a compressed seed, and how to put mutated content back."""

    data: bytes
    fields: tuple[Field, ...]
    wrap: Callable[[bytes], bytes]


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    fields: tuple[Field, ...] = ()
    inner: Layer | None = None
    identity: tuple[str, ...] = ()  # header values no error may quote


@dataclass(frozen=True)
class Sample:
    """One mutated file: what ingest is given, and what its errors may not say."""

    name: str
    data: bytes
    identity: tuple[str, ...]


# -- seeds --


def _dicom_fields(data: bytes) -> tuple[Field, ...]:
    """The length fields of the file meta and top-level elements, and of the items of
    encapsulated pixel data."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data))
    fields: list[Field] = []
    for group in (ds.file_meta, ds):
        for tag in list(group.keys()):
            raw = group.get_item(tag)
            tell = getattr(raw, "value_tell", None)
            if not isinstance(tell, int):
                continue
            short = raw.VR is not None and raw.VR not in _LONG_VRS
            fields.append((tell - 2, 2) if short else (tell - 4, 4))
            if tag == 0x7FE00010 and raw.length == 0xFFFFFFFF:  # item lengths of fragments
                at = data.find(b"\xfe\xff\x00\xe0", tell)
                while at != -1 and len(fields) < 64:
                    fields.append((at + 4, 4))
                    at = data.find(b"\xfe\xff\x00\xe0", at + 8)
    return tuple(fields)


def _identity(data: bytes) -> tuple[str, ...]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    values = (str(ds.get(k, "") or "") for k in _IDENTIFYING)
    return tuple(v for v in values if sum(c.isalnum() for c in v) >= 4)


def _deflated(data: bytes) -> Layer:
    """The inflated data set of a deflated DICOM file (after its file meta group)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    last = ds.file_meta.get_item(max(ds.file_meta.keys()))
    cut = last.value_tell + last.length
    head, body = data[:cut], zlib.decompress(data[cut:], -15)

    def wrap(content: bytes) -> bytes:
        pack = zlib.compressobj(wbits=-15)
        return head + pack.compress(content) + pack.flush()

    return Layer(body, (), wrap)


@functools.cache
def dicom_seeds() -> tuple[Seed, ...]:
    seeds = []
    for name in DICOM_FILES:
        path = get_testdata_file(name)
        assert path is not None, f"pydicom no longer ships {name}"
        data = Path(path).read_bytes()
        if name == "image_dfl.dcm":
            fields: tuple[Field, ...] = ()
            inner: Layer | None = _deflated(data)
        else:
            fields, inner = _dicom_fields(data), None
        seeds.append(Seed(name, data, fields, inner, _identity(data)))
    return tuple(seeds)


def _nifti_fields(data: bytes) -> tuple[Field, ...]:
    if struct.unpack_from("<i", data)[0] == 540:  # NIfTI-2: 64-bit dims and offsets
        dims = tuple((16 + 8 * i, 8) for i in range(8))
        return ((0, 4), (12, 2), (14, 2), *dims, (144, 8), (152, 8), (160, 8), (504, 4))
    dims = tuple((40 + 2 * i, 2) for i in range(8))
    pixdims = tuple((76 + 4 * i, 4) for i in range(8))
    return ((0, 4), *dims, (70, 2), (72, 2), *pixdims, (108, 4), (112, 4), (252, 2), (254, 2))


def _gzipped(data: bytes) -> Layer:
    content = gzip.decompress(data)
    return Layer(content, _nifti_fields(content), lambda c: gzip.compress(c, mtime=0))


@functools.cache
def nifti_seeds() -> tuple[Seed, ...]:
    seeds = []
    for name in NIFTI_FILES:
        data = (Path(nibabel_data) / name).read_bytes()
        if name.endswith(".gz"):
            seeds.append(Seed(name, data, (), _gzipped(data)))
        else:
            seeds.append(Seed(name, data, _nifti_fields(data)))
    return tuple(seeds)


def _zip_fields(data: bytes) -> tuple[Field, ...]:
    """Sizes, name lengths and offsets of the local headers, the central directory and
    its end record."""
    layout = {
        b"PK\x03\x04": ((14, 4), (18, 4), (22, 4), (26, 2), (28, 2)),
        b"PK\x01\x02": ((16, 4), (20, 4), (24, 4), (28, 2), (30, 2), (42, 4)),
        b"PK\x05\x06": ((8, 2), (10, 2), (12, 4), (16, 4)),
    }
    fields: list[Field] = []
    for signature, offsets in layout.items():
        at = data.find(signature)
        while at != -1:
            fields += [(at + off, size) for off, size in offsets]
            at = data.find(signature, at + 4)
    return tuple(f for f in fields if f[0] + f[1] <= len(data))


def _member_layer(members: list[tuple[str, bytes]], index: int) -> Layer:
    def wrap(content: bytes) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for i, (name, data) in enumerate(members):
                zf.writestr(name, content if i == index else data)
        return buf.getvalue()

    data = members[index][1]
    return Layer(data, _dicom_fields(data), wrap)


@functools.cache
def zip_seeds() -> tuple[Seed, ...]:
    """A zip of a three-slice CT series (as sent to the service), mutated as bytes or in
    one of its members."""
    with tempfile.TemporaryDirectory() as tmp:
        write_series(Path(tmp), phantom(3, 8, 8, seed=5))
        data = zip_bytes(Path(tmp))
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = [(i.filename, zf.read(i)) for i in zf.infolist()]
    identity = tuple(sorted({v for _, member in members for v in _identity(member)}))
    return tuple(
        Seed(f"study-{i}.zip", data, _zip_fields(data), _member_layer(members, i), identity)
        for i in range(len(members))
    )


SEEDS: dict[str, Callable[[], tuple[Seed, ...]]] = {
    "dicom": dicom_seeds,
    "nifti": nifti_seeds,
    "zip": zip_seeds,
}

# -- mutations --


def _position(draw: st.DrawFn, n: int) -> int:
    """An offset into ``n`` bytes, half the time within the first KiB (the headers)."""
    return draw(st.one_of(st.integers(0, min(n, 1024) - 1), st.integers(0, n - 1)))


def _boundary(draw: st.DrawFn, old: int, size: int) -> int:
    top = (1 << (8 * size)) - 1
    picks = [0, 1, top, top >> 1, (top >> 1) + 1, old + 1, old - 1, old * 2, old // 2, 0xFFFF]
    return draw(st.sampled_from(picks)) & top


def _mutate(draw: st.DrawFn, data: bytes, fields: tuple[Field, ...]) -> bytes:
    buf = bytearray(data)
    # Flips and field edits keep the length, so the readers behind the length checks see
    # them: they come three times as often as the splices.
    ops = ["flip"] * 3 + ["truncate", "insert", "delete", "copy"] + ["field"] * 3 * bool(fields)
    for _ in range(draw(st.integers(1, 3))):
        if not buf:
            break
        op, n = draw(st.sampled_from(ops)), len(buf)
        if op == "flip":
            buf[_position(draw, n)] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del buf[draw(st.integers(0, n - 1)) :]
        elif op == "insert":
            at = _position(draw, n)
            buf[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            at = _position(draw, n)
            del buf[at : at + draw(st.integers(1, 256))]
        elif op == "copy":
            src, dst = _position(draw, n), _position(draw, n)
            buf[dst:dst] = buf[src : src + draw(st.integers(1, 512))]
        else:
            at, size = draw(st.sampled_from(fields))
            if at + size <= len(buf):
                old = int.from_bytes(buf[at : at + size], "little")
                buf[at : at + size] = _boundary(draw, old, size).to_bytes(size, "little")
    return bytes(buf)


@st.composite
def _mutated(draw: st.DrawFn, seeds: tuple[Seed, ...]) -> Sample:
    seed = draw(st.sampled_from(seeds))
    if seed.inner is not None and draw(st.booleans()):  # mutate what the wrapper holds
        inner = seed.inner
        return Sample(seed.name, inner.wrap(_mutate(draw, inner.data, inner.fields)), seed.identity)
    return Sample(seed.name, _mutate(draw, seed.data, seed.fields), seed.identity)


def mutated(seeds: tuple[Seed, ...]) -> st.SearchStrategy[Sample]:
    """Samples: one of ``seeds`` with one to three mutations."""
    return _mutated(seeds)


# -- the check --


def ingest(name: str, data: bytes) -> list[InputError]:
    """Scan ``data`` and load every candidate, as a worker does; the input errors."""
    result = scan([(name, data)], PSEUDO, limits=LIMITS)
    errors = list(result.errors)
    for candidate in result.candidates:
        try:
            candidate.load()
        except InputError as exc:
            errors.append(exc)
    return errors


_OURS = str(Path(radcache.embeddings.__file__).resolve().parent)


def _own_bug(exc: BaseException) -> BaseException | None:
    """The programming error ``exc`` was raised for (hidden or not: ``raise … from
    None``) when radcache's own code raised it, or None. A library failing on bad data
    (pydicom, nibabel, a decoder) is what a catch-all is for; radcache indexing past a
    list it did not check is a bug."""
    inner = exc.__cause__ or exc.__context__
    if not isinstance(inner, PROGRAMMING_ERRORS):
        return None
    tb = inner.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return inner if tb is not None and tb.tb_frame.f_code.co_filename.startswith(_OURS) else None


def check(sample: Sample) -> list[InputError]:
    """Ingest ``sample`` under the watchdog; assert its errors are documented, name the
    file, quote no identifying value and wrap no programming error. Returns them."""
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    try:
        with warnings.catch_warnings():  # as in production: warnings are not errors
            warnings.simplefilter("ignore")
            errors = ingest(sample.name, sample.data)
    finally:
        faulthandler.cancel_dump_traceback_later()
    for exc in errors:
        text = str(exc)
        assert isinstance(exc, RadcacheError) and type(exc).__module__.endswith(".errors"), text
        assert exc.path, f"{exc.code} names no file: {text}"
        assert not [v for v in sample.identity if v in text], f"quotes a header value: {text}"
        bug = _own_bug(exc)
        assert bug is None, f"{exc.code} wraps {type(bug).__name__}: {bug} ({text})"
    return errors


def env_examples(default: int) -> int:
    """``RADCACHE_FUZZ_EXAMPLES`` or ``default``."""
    return int(os.environ.get("RADCACHE_FUZZ_EXAMPLES") or default)
