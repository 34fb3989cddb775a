"""Deflated DICOM datasets inflated as far as they are read, charged to the input's budget.

pydicom inflates a Deflated Explicit VR Little Endian dataset (transfer syntax
1.2.840.10008.1.2.1.99) whole, in memory and without a bound, before it parses the first
element: a few kilobytes of deflate can make it allocate gigabytes. :func:`open_dataset`
reads the file meta information first; a deflated dataset is then parsed through
:class:`Inflating`, a seekable view that inflates only as far as it is read, a chunk at
a time, into a spool (memory up to :data:`~._sources.SPOOL_BYTES`, a temporary file
beyond), charging each chunk to the input's budget before it is written, so inflating
stops the moment the budget is spent. Every other file is read by pydicom as usual.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any, BinaryIO, cast

import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

from ._sources import SPOOL_BYTES

__all__ = ["Inflating", "open_dataset"]

_CHUNK = 1 << 20  # bytes inflated per step
StopWhen = Callable[[Any, str | None, int], bool]


class Inflating(io.RawIOBase):
    """The inflated bytes of the raw deflate stream that ``source`` continues with, as a
    readable, seekable file: inflated on demand (``charge`` is told the inflated size, and
    raises to stop), kept in a spool that moves to a temporary file past
    :data:`SPOOL_BYTES`. Closing it removes the spool, not ``source``."""

    def __init__(self, source: IO[bytes], charge: Callable[[int], None]) -> None:
        super().__init__()
        self._source = source
        self._charge = charge
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._spool: IO[bytes] = io.BytesIO()
        self._spill_dir: str | None = None
        self._size = self._pos = 0
        self._done = False

    def _inflate(self) -> bool:
        """Add the next inflated chunk to the spool; False at the end of the stream."""
        while not self._done:
            data = self._z.unconsumed_tail or self._source.read(_CHUNK)
            if data:
                out = self._z.decompress(data, _CHUNK)
                self._done = self._z.eof
            else:  # the stream ends (cut short, if the deflate stream has not)
                out, self._done = self._z.flush(), True
            if out:
                self._charge(self._size + len(out))  # before a byte of it is kept
                self._spill(len(out))
                self._spool.seek(self._size)
                self._spool.write(out)
                self._size += len(out)
                return True
        return False

    def _spill(self, more: int) -> None:
        if self._spill_dir is not None or self._size + more <= SPOOL_BYTES:
            return
        self._spill_dir = tempfile.mkdtemp(prefix="radcache-inflate-")
        disk = open(f"{self._spill_dir}/dataset", "w+b")  # noqa: SIM115 - closed by close()
        self._spool.seek(0)
        shutil.copyfileobj(self._spool, disk, _CHUNK)
        self._spool.close()
        self._spool = disk

    def _upto(self, end: int) -> int:
        """Inflate until ``end`` bytes are there, or the stream ends; the bytes there."""
        while self._size < end and self._inflate():
            pass
        return self._size

    def read(self, size: int | None = -1, /) -> bytes:
        want = self._pos + size if size is not None and size >= 0 else 1 << 62
        end = min(want, self._upto(want))
        self._spool.seek(self._pos)
        data = self._spool.read(max(0, end - self._pos))
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any, /) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int:
        if whence == io.SEEK_END:
            offset += self._upto(1 << 62)
        elif whence == io.SEEK_CUR:
            offset += self._pos
        if offset < 0:
            raise OSError("seek before the start of the inflated dataset")
        self._pos = offset
        return offset

    def close(self) -> None:
        if not self.closed:
            self._spool.close()
            if self._spill_dir is not None:
                shutil.rmtree(self._spill_dir, ignore_errors=True)
        super().close()


@contextlib.contextmanager
def open_dataset(
    fp: IO[bytes],
    charge: Callable[[int], None],
    *,
    defer_size: int | None = None,
    stop_when: StopWhen | None = None,
) -> Iterator[Dataset]:
    """The dataset of the DICOM file ``fp`` (read with ``force``, values over
    ``defer_size`` left unread until used, parsing stopped where ``stop_when`` says), usable
    inside the block. A deflated dataset inflates only as far as it is parsed, and
    ``charge`` is told how far that is (it raises to stop)."""
    binary = cast(BinaryIO, fp)
    start = fp.tell()
    try:
        preamble = read_preamble(binary, True)
        meta = _read_file_meta_info(binary)
    except Exception:  # not a PS3.10 file meta: pydicom reports what is wrong below
        meta = None
    if meta is None or meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        fp.seek(start)
        if stop_when is None:
            yield pydicom.dcmread(fp, force=True, defer_size=defer_size)
        else:
            yield pydicom.filereader.read_partial(binary, stop_when, defer_size, force=True)
        return
    with Inflating(fp, charge) as inflated:  # as pydicom's read_partial, inflating as read
        found = read_dataset(
            inflated,  # type: ignore[arg-type]
            is_implicit_VR=False,
            is_little_endian=True,
            stop_when=stop_when,
            defer_size=defer_size,
        )
        ds = FileDataset(inflated, found, preamble, meta, False, True)
        ds.set_original_encoding(False, True, found._character_set)
        yield ds
