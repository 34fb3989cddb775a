"""NIfTI (nibabel) and other SimpleITK-readable volumes (NRRD, MetaImage).

Both are converted from their own conventions (NIfTI: RAS affine over ``data[i, j, k]``;
ITK: LPS direction over ``array[k, j, i]``) into radcache's canonical layout, taking the
file's third axis as the slice axis — the acquisition plane for scanner-converted files.

Opening a file reads its header only (the file is hashed as a stream for its key); the
voxels are read, decompressed and converted when a volume is loaded, one time point at a
time, and nothing of them is kept.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import xxhash

from ..errors import InvalidNiftiError, UnreadableVolumeError, UnsupportedInputError
from ..volume import Volume, VolumeMeta
from ._sources import Source

__all__ = ["VolumeFile", "open_itk", "open_nifti"]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class VolumeFile:
    """One non-DICOM file: its key, number of volumes (time points) and slices per volume."""

    name: str
    key: str
    n_volumes: int
    n_slices: int
    load: Callable[[int], Volume]


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
def _nifti_stream(source: Source) -> Iterator[IO[bytes] | gzip.GzipFile]:
    """The NIfTI bytes of ``source`` as a stream, gunzipped as read if compressed."""
    with source.fileobj() as raw:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        if not gz:
            yield raw
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            yield unzipped


def _nifti_image(stream: Any) -> Any:
    """A NIfTI-1 or NIfTI-2 image over ``stream`` (a seekable binary file object): the
    header read, the voxels not yet."""
    import nibabel as nib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return nib.Nifti1Image.from_stream(stream)
        except Exception:
            stream.seek(0)
            return nib.Nifti2Image.from_stream(stream)


def open_nifti(source: Source, modality: str | None = None) -> VolumeFile:
    """Read a NIfTI-1/2 header; loading a time point decodes only that volume."""
    try:
        with _nifti_stream(source) as stream:
            img = _nifti_image(stream)
            full_shape = tuple(int(s) for s in img.shape)
            affine = np.asarray(img.affine, dtype=np.float64)
            hdr = img.header
            qs_codes = int(hdr["sform_code"]), int(hdr["qform_code"])
    except Exception as exc:
        raise InvalidNiftiError(
            f"the NIfTI header could not be read ({exc}); "
            "expected a valid NIfTI-1 or NIfTI-2 file.",
            path=source.name,
        ) from exc
    del img
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

    def load(t: int) -> Volume:
        try:
            with _nifti_stream(source) as stream, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img = _nifti_image(stream)
                if tuple(int(s) for s in img.shape) != full_shape:
                    raise ValueError(f"the header now gives shape {img.shape}, not {full_shape}")
                proxy = img.dataobj
                # index the time axis explicitly: trailing length-1 axes beyond it
                # (dropped from ``shape``) are still in the proxy
                tail = (0,) * (len(full_shape) - 4)
                arr = np.asarray(proxy[(slice(None),) * 3 + (t, *tail)] if n_t > 1 else proxy)
        except Exception as exc:
            raise InvalidNiftiError(
                f"the voxel data could not be read ({exc}); the file may be truncated.",
                path=source.name,
            ) from exc
        arr = arr.reshape(shape[:3])
        if arr.dtype.fields is not None:
            raise UnsupportedInputError(
                f"NIfTI voxel type {arr.dtype} (RGB or complex) is not supported; "
                "expected scalar voxels.",
                path=source.name,
            )
        vol = np.asarray(arr, dtype=np.float32).transpose(2, 1, 0)  # (k, j, i)
        del arr
        if not np.all(np.isfinite(vol)):
            vol = np.nan_to_num(vol, nan=0.0, posinf=0.0, neginf=0.0)
        part = f"t={t}" if n_t > 1 else ""
        return Volume.from_array(
            vol, dirs, spacing, origin, _meta(key, part, modality, "nifti", notes)
        )

    return VolumeFile(name=source.name, key=key, n_volumes=n_t, n_slices=shape[2], load=load)


def _lps(affine_ras: np.ndarray) -> np.ndarray:
    out = affine_ras.copy()
    out[:3, :] = _RAS_TO_LPS @ affine_ras[:3, :]
    return out


def open_itk(source: Source, modality: str | None = None) -> VolumeFile:
    """Read a NRRD/MetaImage header through SimpleITK; loading reads the voxels."""
    import SimpleITK as sitk

    suffix = os.path.splitext(source.name)[1]
    try:
        with source.local_path(suffix) as path:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            dim, components = reader.GetDimension(), reader.GetNumberOfComponents()
            size = tuple(int(n) for n in reader.GetSize())
            direction = np.asarray(reader.GetDirection(), dtype=np.float64)
            spacing_ijk = np.asarray(reader.GetSpacing(), dtype=np.float64)
            origin = np.asarray(reader.GetOrigin(), dtype=np.float64)
    except RuntimeError as exc:
        raise _unreadable(exc, source) from exc
    if components != 1 or dim not in (2, 3):
        raise UnsupportedInputError(
            f"{dim}-D image with {components} components "
            "per voxel; expected a 2-D or 3-D scalar volume.",
            path=source.name,
        )
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
        try:
            with source.local_path(suffix) as path:
                img = sitk.ReadImage(str(path))
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
        vol = np.asarray(arr, dtype=np.float32)
        del arr
        return Volume.from_array(vol, dirs, spacing, origin, _meta(key, "", modality, "itk", []))

    return VolumeFile(name=source.name, key=key, n_volumes=1, n_slices=shape[0], load=load)


def _unreadable(exc: RuntimeError, source: Source) -> UnreadableVolumeError:
    first = str(exc).strip().splitlines()[-1] if str(exc).strip() else str(exc)
    return UnreadableVolumeError(f"SimpleITK could not read the volume: {first}", path=source.name)
