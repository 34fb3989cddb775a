"""Bounds on what one input may make ingest allocate and inflate (hostile uploads).

Two limits, both checked before the expensive work: :attr:`Limits.max_voxels`, read from
each header (NIfTI, NRRD, MetaImage, DICOM rows × columns × frames × samples) before a
voxel is read or decoded, and :attr:`Limits.max_decompressed_bytes`, a :class:`Budget`
that one input (an upload, a directory, one scan) shares: zip members, gzipped volumes,
compressed pixel data and deflated DICOM datasets charge it as they inflate
(:func:`counted`), or with their declared size before they start, so inflating stops as
soon as the budget is spent.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, cast

from ..errors import DecompressedTooLargeError, VolumeTooLargeError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["Budget", "Limits", "counted"]

_CHUNK = 1 << 20  # bytes inflated between two charges


@dataclass(frozen=True)
class Limits:
    """What one input may declare and inflate to. ``max_voxels`` (2²⁹, 512 Mi voxels, 2 GiB
    as float32) fits the largest common study, a 512 × 512 × 2048 CT, and bounds what one
    series may make a loader hold; a 1024³ volume is refused from its header."""

    max_voxels: int = 1 << 29
    max_decompressed_bytes: int = 16 << 30

    def check_voxels(self, n: int, what: str, name: str) -> None:
        """Raise :class:`VolumeTooLargeError` naming ``name`` when ``what`` (a header,
        described for the message) declares more than :attr:`max_voxels` voxels."""
        if n > self.max_voxels:
            raise VolumeTooLargeError(
                f"{what} declares {n} voxels; at most {self.max_voxels} are accepted. Send a "
                "smaller (cropped or downsampled) volume, or raise RADCACHE_MAX_VOXELS.",
                path=name,
            )


class Budget:
    """The bytes one input may still inflate to, shared by all its sources (thread-safe).

    Each stream charges how far it has got under its own key, so a file read again (at
    load, after the scan) is not counted twice.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.used = 0
        self._seen: dict[object, int] = {}
        self._lock = threading.Lock()

    def charge(self, key: object, upto: int, name: str) -> None:
        """Record that the stream ``key`` (of the file ``name``) has inflated to ``upto``
        bytes; raise :class:`DecompressedTooLargeError` past the limit."""
        self.reserve({key: upto}, name)

    def meter(self, key: object, name: str) -> Callable[[int], None]:
        """:meth:`charge` for one stream, as :func:`counted` takes it."""
        return lambda upto: self.charge(key, upto, name)

    def reserve(self, sizes: Mapping[object, int], name: str) -> None:
        """Charge several streams at once (a zip's declared member sizes), all or none."""
        with self._lock:
            extra = {k: n - self._seen.get(k, 0) for k, n in sizes.items()}
            more = sum(n for n in extra.values() if n > 0)
            if self.used + more > self.limits.max_decompressed_bytes:
                raise DecompressedTooLargeError(
                    f"it would inflate to more than the {self.limits.max_decompressed_bytes} "
                    f"bytes one upload may decompress to ({self.used} already, {more} more); "
                    "inflating stopped there. Send it in smaller parts, or raise "
                    "RADCACHE_MAX_DECOMPRESSED_BYTES.",
                    path=name,
                )
            for k, n in extra.items():
                if n > 0:
                    self._seen[k] = sizes[k]
            self.used += more


class _Counted(io.BufferedIOBase):
    """A read-only view of an inflating stream that reports its position to ``charge``
    every :data:`_CHUNK` bytes (a read of any size is split), before a seek, and refuses
    to seek from the end (which would inflate everything first)."""

    def __init__(self, inner: IO[bytes] | io.BufferedIOBase, charge: Callable[[int], None]) -> None:
        super().__init__()
        self._inner = inner
        self._charge = charge
        self._pos = inner.tell() if inner.seekable() else 0

    def _step(self, n: int) -> bytes:
        data = self._inner.read(n)
        self._pos += len(data)
        self._charge(self._pos)
        return data

    def read(self, size: int | None = -1, /) -> bytes:
        parts: list[bytes] = []
        left = -1 if size is None or size < 0 else size
        while left != 0:
            data = self._step(_CHUNK if left < 0 else min(left, _CHUNK))
            if not data:
                break
            parts.append(data)
            if left > 0:
                left -= len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read1(self, size: int = -1, /) -> bytes:
        return self._step(_CHUNK if size < 0 else min(size, _CHUNK))

    def readinto(self, buffer: WriteableBuffer, /) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            data = self._step(min(len(view) - done, _CHUNK))
            if not data:
                break
            view[done : done + len(data)] = data
            done += len(data)
        return done

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._inner.seekable()

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int:
        if whence == io.SEEK_END:
            raise io.UnsupportedOperation("seeking from the end of an inflating stream")
        target = offset if whence == io.SEEK_SET else self._pos + offset
        self._charge(target)  # inflating up to a forward target counts before it happens
        self._pos = self._inner.seek(target)
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._inner.close()
        super().close()


def counted(inner: IO[bytes] | io.BufferedIOBase, charge: Callable[[int], None]) -> IO[bytes]:
    """``inner`` (an inflating stream), calling ``charge`` with how far it has got as it
    is read (at least every MiB, and before each seek); ``charge`` raises to stop it."""
    return cast("IO[bytes]", _Counted(inner, charge))
