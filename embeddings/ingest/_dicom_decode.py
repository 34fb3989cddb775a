"""DICOM pixel decoding: the stored values of each frame, decoded once per file.

When a series is loaded, each of its files is read again (:func:`read_dataset`), decoded
once, and dropped as soon as its last frame has been taken (:class:`FilePixels`), so a
series holds at most the files it is between. Native little-endian grey data is read
straight from the buffer; everything else goes through pydicom's decoders, never GDCM's
(:func:`_pixel_array`). Decoder failures, a decoder's Rust panic included, become
:class:`InputError` values naming the file (truncated data, a transfer syntax with no
decoder here, corrupt frames).

Before a file is decoded its header is held to the input's limits
(:class:`~._limits.Limits`): rows × columns × samples × frames, of the file and of the
series, against the voxel limit; compressed pixel data charges its decoded size to the
input's budget; and RLE data too short for the image it declares (RLE inflates at most
64:1) is refused as corrupt, so a few kilobytes cannot make a decoder allocate gigabytes.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from ..errors import DecodeError, InputError, TruncatedFileError, UnsupportedTransferSyntaxError
from ..pseudonyms import Pseudonymizer
from ._dicom_read import Frame, read_dataset
from ._dicom_values import uint_of

if TYPE_CHECKING:
    from ._decode_pool import DecodeJob, DecodePool

__all__ = ["FilePixels", "decode_file", "errors_for"]

_NATIVE_LE = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
#: Most bytes of image one byte of RLE (PackBits) data decodes to: a 2-byte run gives 128.
_RLE_MAX_RATIO = 64


def _check_size(ds: Dataset, frame: Frame, series_frames: int) -> None:
    """Hold the file behind ``frame`` to its input's limits from its header alone, before
    any pixel is decoded (the series has ``series_frames`` frames of the same size)."""
    name, source = frame.source, frame.file
    rows, cols = uint_of(ds, "Rows", name, 0), uint_of(ds, "Columns", name, 0)
    spp = uint_of(ds, "SamplesPerPixel", name, 1) or 1
    n = uint_of(ds, "NumberOfFrames", name, 1) or 1
    per_frame = rows * cols * spp
    size = f"{rows}×{cols}, {spp} sample(s) per pixel"
    source.limits.check_voxels(per_frame * n, f"the header ({n} frame(s) of {size})", name)
    source.limits.check_voxels(
        per_frame * series_frames, f"its series ({series_frames} frames of {size})", name
    )
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None or not tsyntax.is_compressed or "PixelData" not in ds:
        return
    decoded = per_frame * n * ((uint_of(ds, "BitsAllocated", name, 8) + 7) // 8)
    packed = len(ds.PixelData or b"")  # an empty value reads as None
    if tsyntax == RLELossless and decoded > _RLE_MAX_RATIO * packed:
        raise DecodeError(
            f"the RLE pixel data ({packed} bytes) is far too short for the image its header "
            f"declares ({decoded} bytes; RLE packs at most {_RLE_MAX_RATIO}:1); the file is "
            "corrupt or its Rows, Columns or Number of Frames are wrong.",
            path=name,
        )
    if source.budget is not None:
        source.budget.charge((source, "pixels"), decoded, name)


def _worth_a_worker(ds: Dataset) -> bool:
    """JPEG-family pixel data (JPEG, JPEG-LS, JPEG 2000): slow enough to decode that a
    worker process gains (RLE decodes faster than its array crosses to this process)."""
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return tsyntax is not None and tsyntax.is_compressed and tsyntax != RLELossless


def _native_pixels(ds: Dataset) -> np.ndarray | None:
    """Uncompressed little-endian grey pixels straight from the buffer, when that is exact.

    Covers the common case (8/16-bit, all allocated bits stored, or unsigned) without
    pydicom's per-file decode machinery; anything else returns None and goes to pydicom.
    """
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax not in _NATIVE_LE or "PixelData" not in ds or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    bits, stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if bits not in (8, 16) or (signed and stored != bits):
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    buf = ds.PixelData
    if len(buf) < n * rows * cols * dtype.itemsize:
        return None
    arr = np.frombuffer(buf, dtype=dtype, count=n * rows * cols)
    if not signed and stored < bits:
        arr = arr & np.asarray((1 << stored) - 1, dtype=dtype)  # drop bits outside BitsStored
    return arr.reshape((n, rows, cols) if n > 1 else (rows, cols))


def _pixel_array(ds: Dataset, tsyntax: UID | None) -> np.ndarray:
    """``ds.pixel_array``, by pydicom's decoder plugins in its order but never GDCM: its
    JPEG codec aborts the whole process (an uncaught C++ exception) on some corrupt data,
    and pylibjpeg covers every syntax it does. Raises the first plugin's error when none
    can decode."""
    if tsyntax is None or not tsyntax.is_compressed:
        return ds.pixel_array
    try:
        plugins = [p for p in get_decoder(tsyntax).available_plugins if p != "gdcm"]
    except NotImplementedError:  # no decoder for the syntax: pydicom says so
        plugins = []
    if not plugins:
        return ds.pixel_array
    errors: list[Exception] = []
    for plugin in plugins:
        try:
            arr: np.ndarray = pixel_array(ds, decoding_plugin=plugin)
            return arr
        except Exception as exc:  # the next plugin may read it
            errors.append(exc)
    raise errors[0]


def decode_file(ds: Dataset, name: str) -> np.ndarray:
    """All frames of the file whose dataset is ``ds``."""
    fast = _native_pixels(ds)
    if fast is not None:
        return fast
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = _pixel_array(ds, tsyntax)
    except ValueError as exc:
        msg = str(exc)
        if "less than expected" in msg or "ended" in msg or "truncated" in msg:
            raise TruncatedFileError(
                "the pixel data is shorter than its header says "
                f"({msg.split(' - ', maxsplit=1)[0]}); "
                "the file was cut short in transfer — send it again.",
                path=name,
            ) from exc
        raise DecodeError(f"pixel data could not be decoded: {msg}", path=name) from exc
    except (NotImplementedError, RuntimeError) as exc:
        if tsyntax is not None and tsyntax.is_compressed:
            try:
                available = get_decoder(tsyntax).is_available
            except NotImplementedError:
                available = False
            if not available:
                raise UnsupportedTransferSyntaxError(
                    f"transfer syntax {tsyntax.name} ({tsyntax}) has no decoder here; radcache "
                    "decodes JPEG (baseline, extended, lossless), JPEG-LS, JPEG 2000, RLE, deflate "
                    "and uncompressed data. Send the series in one of those.",
                    path=name,
                ) from exc
        raise DecodeError(
            f"the compressed frame could not be decoded ({exc}); the file may be corrupt.",
            path=name,
        ) from exc
    except Exception as exc:
        raise DecodeError(f"pixel data could not be decoded ({exc}).", path=name) from exc
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # a decoder in Rust panics on some corrupt data (pyo3)
        raise DecodeError(
            f"the compressed frame could not be decoded (the decoder failed: "
            f"{type(exc).__name__}); the file may be corrupt.",
            path=name,
        ) from exc
    return arr


def _frame_of(arr: np.ndarray, ds: Dataset, index: int | None) -> np.ndarray:
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1))
    if (n_frames > 1 or index is not None) and arr.ndim == (3 if spp == 1 else 4):
        return np.asarray(arr[index or 0])
    return arr


class FilePixels:
    """The frames of one series, taken in any order: each file is read and decoded when
    its first frame is asked for, and let go once its last frame has been taken.

    With a :class:`~._decode_pool.DecodePool`, frames are expected in the order of
    ``frames``: files are read up to ``2 × workers`` ahead of the one asked for, and
    compressed ones decoded meanwhile in the pool's processes. A file that cannot be read
    or decoded fails when its frame is taken, as without the pool."""

    def __init__(
        self, frames: list[Frame], pseudo: Pseudonymizer, pool: DecodePool | None = None
    ) -> None:
        self._pseudo = pseudo
        self._n = len(frames)
        self._left = Counter(id(f.file) for f in frames)
        self._open: dict[int, tuple[Dataset, np.ndarray]] = {}
        self._pool = pool
        # A frame of each file, files in the order their first frames come (read ahead).
        self._ahead = list({id(f.file): f for f in frames}.values()) if pool else []
        self._next = 0  # files of ``_ahead`` read so far
        self._pending: dict[int, tuple[Dataset, DecodeJob | None] | Exception] = {}

    def take(self, frame: Frame) -> tuple[Dataset, np.ndarray]:
        """The file's dataset and the stored values of ``frame``."""
        key = id(frame.file)
        got = self._open.get(key)
        if got is None:
            got = self._load(frame) if self._pool is None else self._from_pool(frame)
            self._open[key] = got
        self._left[key] -= 1
        if self._left[key] <= 0:
            del self._open[key]
        ds, arr = got
        return ds, _frame_of(arr, ds, frame.index)

    def _read(self, frame: Frame) -> Dataset:
        ds = read_dataset(frame, self._pseudo)
        _check_size(ds, frame, self._n)
        return ds

    def _load(self, frame: Frame) -> tuple[Dataset, np.ndarray]:
        ds = self._read(frame)
        return ds, decode_file(ds, frame.source)

    def _from_pool(self, frame: Frame) -> tuple[Dataset, np.ndarray]:
        assert self._pool is not None
        key = id(frame.file)
        window = 2 * self._pool.workers
        while self._next < len(self._ahead) and (
            key not in self._pending or len(self._pending) < window
        ):
            first = self._ahead[self._next]
            self._next += 1
            try:
                ds = self._read(first)
                job = self._pool.submit(ds, first.source) if _worth_a_worker(ds) else None
                self._pending[id(first.file)] = (ds, job)
            except Exception as exc:  # raised when its frame is taken, not before
                self._pending[id(first.file)] = exc
        pending = self._pending.pop(key, None)
        if pending is None:  # taken out of order: read it now
            return self._load(frame)
        if isinstance(pending, Exception):
            raise pending
        ds, job = pending
        if job is None:
            return ds, decode_file(ds, frame.source)
        return ds, self._pool.result(job)


def errors_for(exc: Exception, name: str) -> InputError:
    """Wrap an unexpected exception from decoding as an input error naming the series."""
    if isinstance(exc, InputError):
        return exc
    return DecodeError(f"the series could not be read ({type(exc).__name__}: {exc}).", path=name)
