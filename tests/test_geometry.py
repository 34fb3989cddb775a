"""Canonical orientation: any permutation / flip of a volume's axes gives the same array."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from radcache.embeddings.geometry import canonicalize, nearest_axes, plan
from radcache.embeddings.volume import Geometry, Volume, VolumeMeta

META = VolumeMeta(source_format="nifti", study="s", series="s")
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _canonical_axial(shape, spacing, origin, rot=None):
    """An asymmetric volume in canonical axial layout and its (slice, row, col) directions."""
    rot = np.eye(3) if rot is None else rot
    n = int(np.prod(shape))
    arr = np.random.default_rng(n).permutation(n).astype(np.float32).reshape(shape)
    # rows of dirs: slice axis → +z, rows → +y (posterior), columns → +x (left)
    dirs = (rot @ np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]).T).T
    return arr, dirs, np.asarray(spacing, dtype=np.float64), np.asarray(origin, dtype=np.float64)


def _scramble(arr, dirs, spacing, origin, perm, flips):
    """Transpose axes by ``perm`` and flip the chosen new axes, keeping the geometry true."""
    out = np.transpose(arr, perm)
    d = dirs[list(perm)].copy()
    sp = spacing[list(perm)].copy()
    org = origin.copy()
    for axis, flip in enumerate(flips):
        if flip:
            org = org + (out.shape[axis] - 1) * sp[axis] * d[axis]
            d[axis] = -d[axis]
            out = np.flip(out, axis=axis)
    return np.ascontiguousarray(out), d, sp, org


shapes = st.tuples(st.integers(1, 5), st.integers(2, 6), st.integers(2, 6))
spacings = st.tuples(*[st.floats(0.3, 5.0, allow_nan=False) for _ in range(3)])
origins = st.tuples(*[st.floats(-300.0, 300.0, allow_nan=False) for _ in range(3)])
perms = st.permutations([0, 1, 2]).map(tuple)
flip_sets = st.tuples(st.booleans(), st.booleans(), st.booleans())
small_angles = st.floats(-0.5, 0.5, allow_nan=False)  # radians: up to ~29° oblique


@SETTINGS
@given(shapes, spacings, origins, perms, flip_sets)
def test_from_array_undoes_any_permutation_and_flip(shape, spacing, origin, perm, flips):
    arr, dirs, sp, org = _canonical_axial(shape, spacing, origin)
    ref = Volume.from_array(arr, dirs, sp, org, META)
    np.testing.assert_array_equal(ref.voxels, arr)  # already canonical: untouched
    scr, d, s, o = _scramble(arr, dirs, sp, org, perm, flips)
    vol = Volume.from_array(scr, d, s, o, META, slice_axis=perm.index(0))
    np.testing.assert_array_equal(vol.voxels, arr)
    np.testing.assert_allclose(vol.geometry.spacing, ref.geometry.spacing)
    np.testing.assert_allclose(vol.geometry.origin, ref.geometry.origin, atol=1e-9)
    np.testing.assert_allclose(vol.geometry.direction_matrix, ref.geometry.direction_matrix)
    np.testing.assert_allclose(vol.geometry.positions, ref.geometry.positions, atol=1e-9)
    assert vol.content_hash() == ref.content_hash()


@SETTINGS
@given(shapes, spacings, origins, perms, flip_sets, st.booleans(), st.booleans())
def test_an_owned_or_integer_array_canonicalises_alike(
    shape, spacing, origin, perm, flips, square, integer
):
    """Rearranged within the array it was handed (owned), or converted to float32 a slice
    at a time (integers): the same voxels as a copy of the float32 array gives."""
    if square:
        shape = (shape[0], shape[1], shape[1])
    arr, dirs, sp, org = _canonical_axial(shape, spacing, origin)
    scr, d, s, o = _scramble(arr, dirs, sp, org, perm, flips)
    given_arr = scr.astype(np.int32) if integer else scr.copy()
    vol = Volume.from_array(given_arr, d, s, o, META, slice_axis=perm.index(0), owned=True)
    assert vol.voxels.dtype == np.float32 and vol.voxels.flags.c_contiguous
    np.testing.assert_array_equal(vol.voxels, arr)
    untouched = scr.copy()
    Volume.from_array(scr, d, s, o, META, slice_axis=perm.index(0))
    np.testing.assert_array_equal(scr, untouched)  # not owned: never written to


@SETTINGS
@given(shapes, spacings, origins, perms, flip_sets, small_angles, small_angles, small_angles)
def test_oblique_volumes_canonicalise_by_nearest_plane(
    shape, spacing, origin, perm, flips, ax, ay, az
):
    rot = _rotation(ax, ay, az)
    arr, dirs, sp, org = _canonical_axial(shape, spacing, origin, rot)
    # only rotations that leave each axis nearest its own patient axis are unambiguous
    assume(nearest_axes(dirs) == (2, 1, 0) and np.min(np.abs(np.diag(rot))) > 0.75)
    scr, d, s, o = _scramble(arr, dirs, sp, org, perm, flips)
    vol = Volume.from_array(scr, d, s, o, META, slice_axis=perm.index(0))
    np.testing.assert_array_equal(vol.voxels, arr)
    np.testing.assert_allclose(vol.geometry.direction_matrix, rot, atol=1e-9)
    np.testing.assert_allclose(vol.geometry.origin, org, atol=1e-6)


@SETTINGS
@given(shapes, spacings, origins, perms, flip_sets)
def test_every_voxel_keeps_its_patient_position(shape, spacing, origin, perm, flips):
    arr, dirs, sp, org = _canonical_axial(shape, spacing, origin)
    scr, d, s, o = _scramble(arr, dirs, sp, org, perm, flips)
    vol = Volume.from_array(scr, d, s, o, META, slice_axis=perm.index(1))  # rows as slices
    # position of each output voxel, from the output geometry
    g = vol.geometry
    dm = g.direction_matrix
    idx_out = np.indices(vol.voxels.shape).reshape(3, -1).T
    pos_out = (
        g.positions[idx_out[:, 0]]
        + idx_out[:, 1:2] * g.spacing[1] * dm[:, 1]
        + idx_out[:, 2:3] * g.spacing[0] * dm[:, 0]
    )
    # …mapped back through the input geometry to the input voxel it must have come from
    idx_in = np.linalg.solve((d * s[:, None]).T, (pos_out - o).T).T
    rounded = np.rint(idx_in)
    np.testing.assert_allclose(idx_in, rounded, atol=1e-6)
    got = scr[tuple(rounded.astype(np.int64).T)]
    np.testing.assert_array_equal(got, vol.voxels.reshape(-1))
    assert len(np.unique(got)) == got.size  # a bijection: every voxel used once
    assert np.linalg.det(dm) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("name", "slice_dir", "row_dir", "col_dir"),
    [
        ("axial", (0, 0, 1), (0, 1, 0), (1, 0, 0)),
        ("coronal", (0, 1, 0), (0, 0, -1), (1, 0, 0)),
        ("sagittal", (-1, 0, 0), (0, 0, -1), (0, 1, 0)),
    ],
)
def test_display_convention_per_plane(name, slice_dir, row_dir, col_dir):
    """Columns → left/posterior, rows → posterior/inferior, slices along columns × rows."""
    want = np.array([slice_dir, row_dir, col_dir], dtype=np.float64)
    for perm in itertools.permutations(range(3)):
        for flips in itertools.product([False, True], repeat=3):
            arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
            scr, d, s, o = _scramble(arr, want, np.ones(3), np.zeros(3), perm, flips)
            out, nd, _, _, _ = canonicalize(scr, d, s, o, slice_axis=perm.index(0))
            np.testing.assert_array_equal(out, arr, err_msg=f"{name} {perm} {flips}")
            np.testing.assert_allclose(nd, want)


def test_plan_identity_for_canonical_axial():
    p = plan(np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=float), slice_axis=0)
    assert p.order == (0, 1, 2)
    assert p.flips == (False, False, False)


def test_nearest_axes_for_a_nifti_ras_layout():
    # NIfTI (i, j, k) in RAS → LPS directions (−x, −y, +z)
    assert nearest_axes(np.diag([-1.0, -1.0, 1.0])) == (0, 1, 2)
    assert nearest_axes(np.array([[0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0]])) == (2, 0, 1)


def test_positions_kept_and_reordered_with_the_slices():
    arr = np.arange(3 * 2 * 2, dtype=np.float32).reshape(3, 2, 2)
    dirs = np.array([[0, 0, -1.0], [0, 1.0, 0], [1.0, 0, 0]])  # slices descend
    positions = np.array([[0, 0, 10.0], [0.5, 0, 7.0], [1.0, 0, 2.0]])  # sheared, irregular
    out, _, _, origin, pos = canonicalize(
        arr, dirs, np.array([3.0, 1.0, 1.0]), positions[0], slice_axis=0, positions=positions
    )
    np.testing.assert_array_equal(out, arr[::-1])
    np.testing.assert_array_equal(pos, positions[::-1])
    np.testing.assert_array_equal(origin, positions[-1])


def test_content_hash_ignores_float_noise_and_negative_zero():
    arr = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    dirs = np.array([[0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0]])
    a = Volume.from_array(arr, dirs, np.ones(3), np.zeros(3), META)
    noisy = dirs + 1e-9
    noisy[0, 0] = -0.0
    b = Volume.from_array(arr, noisy, np.ones(3) + 1e-9, np.full(3, -1e-9), META)
    assert a.content_hash() == b.content_hash()
    c = Volume.from_array(arr + 1, dirs, np.ones(3), np.zeros(3), META)
    assert c.content_hash() != a.content_hash()
    d = Volume.from_array(arr, dirs, np.ones(3), np.array([0.0, 0.0, 0.01]), META)
    assert d.content_hash() != a.content_hash()


def test_volume_rejects_bad_shapes():
    g = Geometry(
        spacing=(1.0, 1.0, 1.0),
        origin=(0.0, 0.0, 0.0),
        direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
        positions=np.zeros((3, 3)),
    )
    with pytest.raises(ValueError, match="3-D or 4-D"):
        Volume(voxels=np.zeros((4, 4), dtype=np.float32), geometry=g, meta=META)
    with pytest.raises(ValueError, match="positions shape"):
        Volume(voxels=np.zeros((2, 4, 4), dtype=np.float32), geometry=g, meta=META)


def test_colour_channel_axis_rides_along():
    arr = np.arange(2 * 3 * 4 * 3, dtype=np.float32).reshape(2, 3, 4, 3)
    dirs = np.array([[0, 0, 1.0], [0, -1.0, 0], [1.0, 0, 0]])  # rows run anterior: flip
    vol = Volume.from_array(arr, dirs, np.ones(3), np.zeros(3), META)
    np.testing.assert_array_equal(vol.voxels, arr[:, ::-1])
    assert vol.shape == (2, 3, 4, 3)
