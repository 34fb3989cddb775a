"""NIfTI (nibabel) and other SimpleITK-readable volumes (NRRD, MetaImage).

Both are converted from their own conventions (NIfTI: RAS affine over ``data[i, j, k]``;
ITK: LPS direction over ``array[k, j, i]``) into radcache's canonical layout, taking the
file's third axis as the slice axis — the acquisition plane for scanner-converted files.

Opening a file reads its header only (the file is hashed as a stream for its key); the
voxels are read, decompressed and converted when a volume is loaded, one time point at a
time, and nothing of them is kept. The header's voxel count is checked against the
input's :class:`~._limits.Limits` first; a gzipped NIfTI charges the input's budget as it
inflates, and a compressed NRRD/MetaImage its declared size before it is read. A
detached NRRD/MetaImage header is read only with its data files beside it in the same
input (:mod:`._itk_header`); SimpleITK is held to the reader that header is for.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import xxhash

from ..errors import (
    InputError,
    InvalidNiftiError,
    UnreadableVolumeError,
    UnsafeReferenceError,
    UnsupportedInputError,
)
from ..volume import Volume, VolumeMeta
from ._itk_header import MAX_HEADER_BYTES, ItkHeader, read_header
from ._limits import counted
from ._sources import Source

__all__ = ["VolumeFile", "open_itk", "open_nifti"]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
#: Most bytes a NIfTI header and its extensions may take (read before the voxel count).
_NIFTI_HEADER_BYTES = 64 << 20


@dataclass
class VolumeFile:
    """One non-DICOM file: its key, number of volumes (time points) and slices per volume."""

    name: str
    key: str
    n_volumes: int
    n_slices: int
    load: Callable[[int], Volume]
    data_files: tuple[str, ...] = ()  # names of the files a detached header reads


def _content_key(source: Source) -> str:
    """xxh3-128 of the file's bytes, read as a stream."""
    if source.path is None and source.stream is None:
        return xxhash.xxh3_128_hexdigest(source.read())
    h = xxhash.xxh3_128()
    with source.fileobj() as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _meta(key: str, part: str, modality: str | None, fmt: str, notes: list[str]) -> VolumeMeta:
    return VolumeMeta(
        source_format=fmt,  # type: ignore[arg-type]
        study=key,
        series=key,
        part=part,
        modality=modality,
        intensity="raw",
        warnings=tuple(notes),
    )


def _axis_geometry(affine_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Direction rows and spacings for array axes ``(k, j, i)`` from a 4×4 LPS affine."""
    cols = affine_lps[:3, :3]
    spacing_ijk = np.linalg.norm(cols, axis=0)
    if np.any(spacing_ijk <= 0) or not np.all(np.isfinite(cols)):
        raise ValueError(f"affine has a zero or non-finite axis: {cols.tolist()}")
    dirs_ijk = cols / spacing_ijk
    dirs = np.stack([dirs_ijk[:, 2], dirs_ijk[:, 1], dirs_ijk[:, 0]])
    spacing = np.asarray([spacing_ijk[2], spacing_ijk[1], spacing_ijk[0]])
    return dirs, spacing, affine_lps[:3, 3].copy()


@contextlib.contextmanager
def _nifti_stream(source: Source, *, header_only: bool = False) -> Iterator[IO[bytes]]:
    """The NIfTI bytes of ``source`` as a stream, gunzipped as read if compressed (charging
    the input's budget); ``header_only``: refuse to read past the header's size limit."""
    with source.fileobj() as raw:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        budget = source.budget if gz else None
        meter = budget.meter((source, "gunzip"), source.name) if budget is not None else None

        def charge(upto: int) -> None:
            if header_only and upto > _NIFTI_HEADER_BYTES:
                raise InvalidNiftiError(
                    f"the NIfTI header and its extensions run past {_NIFTI_HEADER_BYTES} bytes; "
                    "expected a header of a few kilobytes.",
                    path=source.name,
                )
            if meter is not None:
                meter(upto)

        if not gz:
            yield counted(raw, charge) if header_only else raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            yield counted(unzipped, charge)


def _nifti_image(stream: Any) -> Any:
    """A NIfTI-1 or NIfTI-2 image over ``stream`` (a seekable binary file object): the
    header read, the voxels not yet."""
    import nibabel as nib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return nib.Nifti1Image.from_stream(stream)
        except InputError:
            raise
        except Exception:
            stream.seek(0)
            return nib.Nifti2Image.from_stream(stream)


def open_nifti(source: Source, modality: str | None = None) -> VolumeFile:
    """Read a NIfTI-1/2 header; loading a time point decodes only that volume."""
    try:
        with _nifti_stream(source, header_only=True) as stream:
            img = _nifti_image(stream)
            full_shape = tuple(int(s) for s in img.shape)
            affine = np.asarray(img.affine, dtype=np.float64)
            hdr = img.header
            qs_codes = int(hdr["sform_code"]), int(hdr["qform_code"])
            voxel_type = np.dtype(img.get_data_dtype())
            offset, itemsize = max(0, int(hdr["vox_offset"])), voxel_type.itemsize
    except InputError:
        raise
    except Exception as exc:
        raise InvalidNiftiError(
            f"the NIfTI header could not be read ({exc}); "
            "expected a valid NIfTI-1 or NIfTI-2 file.",
            path=source.name,
        ) from exc
    del img
    dims = "×".join(str(n) for n in full_shape)
    source.limits.check_voxels(
        math.prod(full_shape), f"the NIfTI header (shape {dims})", source.name
    )
    key = _content_key(source)
    notes: list[str] = []
    if qs_codes == (0, 0):
        notes.append("no sform or qform in the NIfTI header; orientation assumed from voxel sizes")
    shape = full_shape
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 2:
        shape = (*shape, 1)
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise UnsupportedInputError(
            f"NIfTI image has shape {shape}; expected 3-D, or 4-D with one volume per time point.",
            path=source.name,
        )
    n_t = shape[3] if len(shape) == 4 else 1
    try:
        dirs, spacing, origin = _axis_geometry(_lps(affine))
    except ValueError as exc:
        raise InvalidNiftiError(f"the NIfTI affine is unusable ({exc}).", path=source.name) from exc

    volume_bytes = math.prod(shape[:3]) * itemsize

    def load(t: int) -> Volume:
        if voxel_type.fields is not None or voxel_type.kind == "c":
            raise UnsupportedInputError(
                f"NIfTI voxel type {voxel_type} (RGB or complex) is not supported; "
                "expected scalar voxels.",
                path=source.name,
            )
        if source.budget is not None and _gzipped(source):  # declared: before any is inflated
            upto = offset + volume_bytes * (t + 1 if n_t > 1 else 1)
            source.budget.charge((source, "gunzip"), upto, source.name)
        try:
            with _nifti_stream(source) as stream, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = _nifti_image(stream)
                if tuple(int(s) for s in img.shape) != full_shape:
                    raise ValueError(f"the header now gives shape {img.shape}, not {full_shape}")
                vol = _nifti_slices(img.dataobj, full_shape, shape, t)
        except InputError:
            raise
        except Exception as exc:
            raise InvalidNiftiError(
                f"the voxel data could not be read ({exc}); the file may be truncated.",
                path=source.name,
            ) from exc
        part = f"t={t}" if n_t > 1 else ""
        meta = _meta(key, part, modality, "nifti", notes)
        return Volume.from_array(vol, dirs, spacing, origin, meta, owned=True)

    return VolumeFile(name=source.name, key=key, n_volumes=n_t, n_slices=shape[2], load=load)


def _nifti_slices(
    proxy: Any, full_shape: tuple[int, ...], shape: tuple[int, ...], t: int
) -> np.ndarray:
    """Time point ``t`` of a NIfTI image as float32 ``(k, j, i)``, read and scaled one
    slice at a time into the one array it fills (never a whole copy in the file's type or
    in float64); non-finite values become 0."""
    out = np.empty((shape[2], shape[1], shape[0]), dtype=np.float32)
    # trailing length-1 axes (dropped from ``shape``) are still in the proxy: index them
    at = [t] + [0] * (len(full_shape) - 4) if len(full_shape) >= 4 else []
    for k in range(shape[2]):
        index = (slice(None), slice(None), *([k] if len(full_shape) >= 3 else []), *at)
        plane = np.asarray(proxy[index]).reshape(shape[:2]).T  # (j, i)
        out[k] = plane
        if plane.dtype.kind == "f" and not np.isfinite(out[k]).all():  # overflow too
            np.nan_to_num(out[k], copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return out


def _gzipped(source: Source) -> bool:
    return source.head(2) == b"\x1f\x8b"


def _lps(affine_ras: np.ndarray) -> np.ndarray:
    out = affine_ras.copy()
    out[:3, :] = _RAS_TO_LPS @ affine_ras[:3, :]
    return out


def _itk_header(source: Source) -> tuple[ItkHeader, list[tuple[str, Source]]]:
    """The header's checks (:mod:`._itk_header`) and its data files, each found beside
    ``source`` in the same input; :class:`UnsafeReferenceError` for one that is not."""
    with source.fileobj() as f:
        header = read_header(f.read(MAX_HEADER_BYTES + 1), source.name)
    data: list[tuple[str, Source]] = []
    for base in dict.fromkeys(header.data_files):
        found = source.sibling(base)
        if found is None:
            raise UnsafeReferenceError(
                "the header names a data file that is not beside it in this input; a data "
                "file must be sent with its header, in the same upload, zip folder or "
                "directory, under the name the header gives it.",
                path=source.name,
            )
        data.append((base, found))
    return header, data


@contextlib.contextmanager
def _staged(source: Source, data: list[tuple[str, Source]]) -> Iterator[Path]:
    """A path to the header on disk with its data files beside it under the names the
    header gives them: the file itself when it lies in a directory (its data files, found
    there, too), else temporary copies (streamed) removed on exit."""
    suffix = os.path.splitext(source.name)[1]
    if source.path is not None:
        yield source.path
        return
    taken = {base for base, _ in data}
    name = next(n for i in itertools.count() if (n := f"header{i}{suffix}") not in taken)
    with tempfile.TemporaryDirectory(prefix="radcache-") as tmp:
        for base, src in [(name, source), *data]:
            with src.fileobj() as fin, open(os.path.join(tmp, base), "wb") as out:
                shutil.copyfileobj(fin, out, 1 << 20)
        yield Path(tmp) / name


def _itk_reader(header: ItkHeader, path: Path) -> Any:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO(header.io)  # the format checked, not one SimpleITK guesses
    reader.SetFileName(str(path))
    return reader


def open_itk(source: Source, modality: str | None = None) -> VolumeFile:
    """Read a NRRD/MetaImage header through SimpleITK; loading reads the voxels."""
    import SimpleITK as sitk

    header, data = _itk_header(source)
    try:
        with _staged(source, data) as path:
            reader = _itk_reader(header, path)
            reader.ReadImageInformation()
            dim, components = reader.GetDimension(), reader.GetNumberOfComponents()
            size = tuple(int(n) for n in reader.GetSize())
            direction = np.asarray(reader.GetDirection(), dtype=np.float64)
            spacing_ijk = np.asarray(reader.GetSpacing(), dtype=np.float64)
            origin = np.asarray(reader.GetOrigin(), dtype=np.float64)
            pixel_id = reader.GetPixelID()
    except RuntimeError as exc:
        raise _unreadable(exc, source) from exc
    if components != 1 or dim not in (2, 3):
        raise UnsupportedInputError(
            f"{dim}-D image with {components} components "
            "per voxel; expected a 2-D or 3-D scalar volume.",
            path=source.name,
        )
    dims = "×".join(str(n) for n in size)
    source.limits.check_voxels(math.prod(size), f"the header (size {dims})", source.name)
    itemsize = sitk.Image([1] * dim, pixel_id).GetSizeOfPixelComponent()
    key = _content_key(source)
    direction = direction.reshape(dim, dim)
    if dim == 2:
        d3 = np.eye(3)
        d3[:2, :2] = direction
        direction, spacing_ijk, origin = d3, np.append(spacing_ijk, 1.0), np.append(origin, 0.0)
    dirs = np.stack([direction[:, 2], direction[:, 1], direction[:, 0]])
    spacing = np.asarray([spacing_ijk[2], spacing_ijk[1], spacing_ijk[0]])
    shape = (size[2] if dim == 3 else 1, size[1], size[0])

    def load(t: int) -> Volume:
        if header.compressed and source.budget is not None:  # declared: before inflating
            source.budget.charge((source, "itk"), math.prod(size) * itemsize, source.name)
        try:
            with _staged(source, data) as path:
                img = _itk_reader(header, path).Execute()
                arr = sitk.GetArrayFromImage(img)
                del img
        except RuntimeError as exc:
            raise _unreadable(exc, source) from exc
        if dim == 2:
            arr = arr[None]
        if arr.shape != shape:
            raise UnreadableVolumeError(
                f"the voxels have shape {arr.shape} but the header read before gave {shape}; "
                "the file changed while it was being embedded. Send it again.",
                path=source.name,
            )
        meta = _meta(key, "", modality, "itk", [])  # float32, converted a slice at a time:
        return Volume.from_array(arr, dirs, spacing, origin, meta, owned=True)

    return VolumeFile(
        name=source.name,
        key=key,
        n_volumes=1,
        n_slices=shape[0],
        load=load,
        data_files=tuple(src.name for _, src in data),
    )


def _unreadable(exc: RuntimeError, source: Source) -> UnreadableVolumeError:
    first = str(exc).strip().splitlines()[-1] if str(exc).strip() else str(exc)
    return UnreadableVolumeError(f"SimpleITK could not read the volume: {first}", path=source.name)
