"""Multi-sequence studies: naming T1/T1c/T2/FLAIR by mapping or heuristics, and resampling
every sequence onto one grid by its geometry (MNI152-derived volumes)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radcache.embeddings import Pseudonymizer
from radcache.embeddings.errors import InputError
from radcache.embeddings.ingest import load_volumes
from radcache.embeddings.sequences import assemble_study, guess_sequence, resample_onto
from radcache.embeddings.volume import Volume, VolumeMeta


def mr(description: str | None = None, **acq: object) -> Volume:
    meta = VolumeMeta("dicom", "st", f"se-{description}", modality="MR",
                      series_description=description, acquisition=dict(acq))  # fmt: skip
    dirs, spacing = np.eye(3), np.ones(3)
    return Volume.from_array(np.zeros((4, 8, 8), np.float32), dirs, spacing, np.zeros(3), meta)


@pytest.mark.parametrize(
    ("description", "acq", "expected"),
    [
        ("Ax FLAIR", {}, "flair"),
        ("t2_tse_tra", {}, "t2"),
        ("T2* GRE", {"repetition_time": 600.0, "echo_time": 20.0}, "t1"),  # T2* is not T2
        ("T1 MPRAGE post Gd", {}, "t1c"),
        ("AX T1 SE", {"contrast_agent": True}, "t1c"),
        ("sag t1 mprage", {}, "t1"),
        (None, {"repetition_time": 9000.0, "echo_time": 90.0, "inversion_time": 2500.0}, "flair"),
        (None, {"repetition_time": 4000.0, "echo_time": 100.0}, "t2"),
        (None, {"repetition_time": 500.0, "echo_time": 12.0, "contrast_agent": True}, "t1c"),
        (None, {"repetition_time": 2300.0, "echo_time": 3.0, "inversion_time": 900.0}, "t1"),
        ("DWI b1000", {"repetition_time": 5000.0, "echo_time": 80.0}, "t2"),
        ("localizer", {}, None),
    ],
)
def test_heuristics_name_sequences_and_say_why(description, acq, expected) -> None:
    seq, why = guess_sequence(mr(description, **acq))
    assert seq == expected, why
    assert why


def _mni(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """The MNI152 T1 at 1 mm and a T2-like contrast (inverted) at 2 mm, same space."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    data = np.asarray(t1.get_fdata(), np.float32)
    t2 = np.where(data > 0, data.max() - data, 0).astype(np.float32)
    coarse = t2[::2, ::2, ::2]
    affine2 = t1.affine.copy()
    affine2[:3, :3] *= 2
    p1, p2 = tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz"
    nib.save(nib.Nifti1Image(data, t1.affine), p1)
    nib.save(nib.Nifti1Image(coarse, affine2), p2)
    return p1, p2, t2


def test_sequences_on_other_grids_are_resampled_onto_the_reference(
    tmp_path: Path, pseudo: Pseudonymizer
) -> None:
    p1, p2, t2_full = _mni(tmp_path)
    vols, errors = load_volumes([p1, p2], pseudo)
    assert not errors
    study = assemble_study(
        vols, {"t1.nii.gz": "t1", "t2.nii.gz": "t2"}, names=["t1.nii.gz", "t2.nii.gz"]
    )
    assert study.reference == "t1" and study.present == ["t1", "t2"]
    t1, t2 = study.volumes["t1"], study.volumes["t2"]
    assert t2.shape == t1.shape and t2.geometry.spacing == t1.geometry.spacing
    # The resampled T2 matches the full-resolution contrast it was cut from, voxel by voxel
    # in radcache's orientation (the T1 went through the same canonicalisation).
    (ideal,), _ = load_volumes([_save(tmp_path, t2_full, p1)], pseudo)
    inside = ideal.voxels > 0

    def r(shift: int, axis: int) -> float:
        moved = np.roll(t2.voxels, shift, axis=axis)
        return float(np.corrcoef(moved[inside], ideal.voxels[inside])[0, 1])

    # Detail lost to the 2 mm grid caps the match; a one-voxel misplacement lowers it.
    assert r(0, 0) > 0.88, r(0, 0)
    assert all(r(0, 0) > r(s, a) + 0.02 for s in (-1, 1) for a in range(3))
    assert [d.reason for d in study.decisions] == ["given in the request's sequence mapping"] * 2


def _save(tmp_path: Path, data: np.ndarray, like: Path) -> Path:
    out = tmp_path / "ideal.nii.gz"
    nib.save(nib.Nifti1Image(data, nib.load(like).affine), out)
    return out


def test_unusable_studies_are_refused_with_reasons() -> None:
    a, b = mr("Ax T1", frame_of_reference="f1"), mr("Ax FLAIR", frame_of_reference="f2")
    with pytest.raises(InputError, match="another frame of reference"):
        resample_onto(b, a)
    with pytest.raises(InputError, match="two volumes were taken as t1"):
        assemble_study([mr("T1 a"), mr("t1 b")])
    with pytest.raises(InputError, match=r"no volume could be named.*localizer"):
        assemble_study([mr("localizer")])
    with pytest.raises(InputError, match="expected one of t1, t1c, t2, flair"):
        assemble_study([mr("T1")], {"se-T1": "pd"})
    study = assemble_study([mr("FLAIR"), mr("T2 tse"), mr("survey")])
    assert study.present == ["t2", "flair"] and study.reference == "t2"
    assert [d.sequence for d in study.decisions] == ["flair", "t2", None]
