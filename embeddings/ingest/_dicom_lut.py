"""DICOM value transforms: modality rescale, VOI LUT / window, MONOCHROME1 inversion."""

from __future__ import annotations

import warnings

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

from ._dicom_read import Frame

#: Modalities whose images are shown through their VOI LUT / window (projection X-ray).
VOI_MODALITIES = {"CR", "DX", "MG", "IO", "PX", "RG"}


def _rescale_into(arr: np.ndarray, ds: Dataset, frame: Frame, out: np.ndarray) -> None:
    """Modality LUT: stored values → ``out`` (float32), e.g. Hounsfield units for CT.

    ``ds`` is the frame's file, read again for its pixels (it has the LUT sequences)."""
    if "ModalityLUTSequence" in ds:
        out[...] = apply_modality_lut(arr, ds)
        return
    slope, inter = frame.slope, frame.intercept
    if slope == 1.0 and float(inter).is_integer():  # exact in float32
        np.add(arr, np.float32(inter), out=out, casting="unsafe")
    else:  # as nibabel does: float64 arithmetic, then float32
        out[...] = arr.astype(np.float64) * slope + inter


def _voi(arr: np.ndarray, file_ds: Dataset, frame: Frame) -> tuple[np.ndarray, bool]:
    ds = file_ds
    if "VOILUTSequence" in ds or frame.window is not None:
        if "VOILUTSequence" not in ds and frame.window is not None:
            c, w = frame.window
            if w <= 0:
                return arr, False
            ds = Dataset()
            ds.WindowCenter, ds.WindowWidth = c, w
            ds.BitsStored = file_ds.get("BitsStored", 16)
            ds.PixelRepresentation = file_ds.get("PixelRepresentation", 0)
            ds.PhotometricInterpretation = "MONOCHROME2"
            fn = file_ds.get("VOILUTFunction")
            if fn:
                ds.VOILUTFunction = fn
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(apply_voi_lut(arr, ds), dtype=np.float32), True
    return arr, False


def _invert_monochrome1(voxels: np.ndarray) -> np.ndarray:
    """MONOCHROME1 (low values shown white) flipped so that it reads as MONOCHROME2."""
    flipped: np.ndarray = (voxels.max() + voxels.min()) - voxels
    return flipped
