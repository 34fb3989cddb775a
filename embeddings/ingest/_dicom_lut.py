"""DICOM value transforms: modality rescale, VOI LUT / window, MONOCHROME1 inversion.

A LUT or window the header describes badly is an error naming the attribute; pydicom's own
messages (which quote the values) are not passed on.
"""

from __future__ import annotations

import warnings

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

from ._dicom_read import Frame
from ._dicom_values import malformed, uint_of

#: Modalities whose images are shown through their VOI LUT / window (projection X-ray).
VOI_MODALITIES = {"CR", "DX", "MG", "IO", "PX", "RG"}
_VOI_FUNCTIONS = {"LINEAR", "LINEAR_EXACT", "SIGMOID"}


def _rescale_into(arr: np.ndarray, ds: Dataset, frame: Frame, out: np.ndarray) -> None:
    """Modality LUT: stored values → ``out`` (float32), e.g. Hounsfield units for CT.

    ``ds`` is the frame's file, read again for its pixels (it has the LUT sequences)."""
    if "ModalityLUTSequence" in ds:
        try:
            out[...] = apply_modality_lut(arr, ds)
        except Exception:  # pydicom's message quotes the values
            raise malformed(
                "ModalityLUTSequence", "a LUT Descriptor and LUT Data that fit", frame.source
            ) from None
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
            ds.BitsStored = uint_of(file_ds, "BitsStored", frame.source, 16)
            ds.PixelRepresentation = uint_of(file_ds, "PixelRepresentation", frame.source, 0)
            ds.PhotometricInterpretation = "MONOCHROME2"
            fn = file_ds.get("VOILUTFunction")
            if fn:
                if str(fn).strip().upper() not in _VOI_FUNCTIONS:
                    raise malformed(
                        "VOILUTFunction", "LINEAR, LINEAR_EXACT or SIGMOID", frame.source
                    )
                ds.VOILUTFunction = str(fn).strip().upper()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return np.asarray(apply_voi_lut(arr, ds), dtype=np.float32), True
        except Exception:  # pydicom's message quotes the values
            kw = "VOILUTSequence" if "VOILUTSequence" in ds else "VOILUTFunction"
            raise malformed(kw, "a VOI LUT or window that fits the pixels", frame.source) from None
    return arr, False


def _invert_monochrome1(voxels: np.ndarray) -> np.ndarray:
    """MONOCHROME1 (low values shown white) flipped so that it reads as MONOCHROME2."""
    flipped: np.ndarray = (voxels.max() + voxels.min()) - voxels
    return flipped
