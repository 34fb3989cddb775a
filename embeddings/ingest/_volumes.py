"""NIfTI (nibabel) and other SimpleITK-readable volumes (NRRD, MetaImage).

Both are converted from their own conventions (NIfTI: RAS affine over ``data[i, j, k]``;
ITK: LPS direction over ``array[k, j, i]``) into radcache's canonical layout, taking the
file's third axis as the slice axis — the acquisition plane for scanner-converted files.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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


def _content_key(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


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


def open_nifti(source: Source, modality: str | None = None) -> VolumeFile:
    """Read a NIfTI-1/2 header; loading a time point decodes only that volume."""
    import nibabel as nib

    raw = source.read()
    key = _content_key(raw)
    data = raw
    try:
        if raw[:2] == b"\x1f\x8b":
            data = gzip.decompress(raw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                img = nib.Nifti1Image.from_bytes(data)
            except Exception:
                img = nib.Nifti2Image.from_bytes(data)
            shape = img.shape
            affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:
        raise InvalidNiftiError(
            f"the NIfTI header could not be read ({exc}); "
            "expected a valid NIfTI-1 or NIfTI-2 file.",
            path=source.name,
        ) from exc
    notes: list[str] = []
    hdr = img.header
    if int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 0:
        notes.append("no sform or qform in the NIfTI header; orientation assumed from voxel sizes")
    shape = tuple(int(s) for s in shape)
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
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                proxy = img.dataobj
                # index the time axis explicitly: trailing length-1 axes beyond it
                # (dropped from ``shape``) are still in the proxy
                tail = (0,) * (len(img.shape) - 4)
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


def _itk_path(source: Source) -> Iterator[str]:
    if source.path is not None:
        yield str(source.path)
        return
    suffix = os.path.splitext(source.name)[1]
    with tempfile.TemporaryDirectory(prefix="radcache-") as tmp:
        p = os.path.join(tmp, "volume" + suffix)
        with open(p, "wb") as f:
            f.write(source.read())
        yield p


def open_itk(source: Source, modality: str | None = None) -> VolumeFile:
    """Read a NRRD/MetaImage volume through SimpleITK."""
    import SimpleITK as sitk

    try:
        for path in _itk_path(source):
            img = sitk.ReadImage(path)
            arr = sitk.GetArrayFromImage(img)
            with open(path, "rb") as f:
                key = _content_key(f.read())
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else str(exc)
        raise UnreadableVolumeError(
            f"SimpleITK could not read the volume: {first}", path=source.name
        ) from exc
    if img.GetNumberOfComponentsPerPixel() != 1 or img.GetDimension() not in (2, 3):
        raise UnsupportedInputError(
            f"{img.GetDimension()}-D image with {img.GetNumberOfComponentsPerPixel()} components "
            "per voxel; expected a 2-D or 3-D scalar volume.",
            path=source.name,
        )
    dim = img.GetDimension()
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing_ijk = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    if dim == 2:
        d3 = np.eye(3)
        d3[:2, :2] = direction
        direction, spacing_ijk, origin = d3, np.append(spacing_ijk, 1.0), np.append(origin, 0.0)
        arr = arr[None]
    dirs = np.stack([direction[:, 2], direction[:, 1], direction[:, 0]])
    spacing = np.asarray([spacing_ijk[2], spacing_ijk[1], spacing_ijk[0]])
    vol = np.asarray(arr, dtype=np.float32)

    def load(t: int) -> Volume:
        return Volume.from_array(vol, dirs, spacing, origin, _meta(key, "", modality, "itk", []))

    return VolumeFile(name=source.name, key=key, n_volumes=1, n_slices=vol.shape[0], load=load)
