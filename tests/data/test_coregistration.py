"""Channel co-registration (``autoseg.data.coregistration``): a channel on another grid, moved by a known rigid
transform, is brought back within a voxel; the fit is deterministic; registrations that cannot work fail in one line.

The phantom (``conftest.brain_phantom``) is defined in world millimetres, so each channel is sampled exactly on its
own oblique, anisotropic grid, and the truth is known independently of any registration: the moving channel shows
at voxel ``y`` the phantom at ``Q(y) = R y + t``, so the transform that brings it back is ``Q⁻¹(x) = Rᵀ (x - t)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import grid_points, oblique_geometry, rotation_matrix, sample_phantom

from autoseg.data.coregistration import (
    ChannelFit,
    RegistrationError,
    coregister_channels,
    register_channel,
    resample_channel,
)
from autoseg.io.typed_json import from_plain, to_plain

#: The reference (DWI-like) grid: 3.5 x 3.5 x 5 mm voxels, tilted by a few degrees; the moving (FLAIR-like) grid:
#: finer, another field of view and another oblique orientation.
REFERENCE = oblique_geometry((40, 46, 24), (3.5, 3.5, 5.0), (4, -3, 6))
MOVING = oblique_geometry((56, 60, 40), (2.5, 2.6, 3.3), (-8, 5, -12), center=(3, -4, 2))
MOTIONS = {
    "3-5 degrees, 4-5 mm": ((3.0, -4.0, 5.0), (4.0, -3.0, 5.0)),
    "6 degrees about z, 8 mm along x": ((0.0, 0.0, 6.0), (8.0, 0.0, 0.0)),
    "2 degrees, 2 mm": ((-2.0, 1.5, -1.0), (-1.0, 2.0, -1.5)),
}


def moved_channel(degrees, shift, geometry=MOVING):
    """The FLAIR-contrast phantom on ``geometry`` with the head moved by the rigid transform (R, t)."""
    rotation, translation = rotation_matrix(degrees), np.asarray(shift, float)
    return sample_phantom(geometry, "flair", (rotation, translation)), rotation, translation


@pytest.mark.parametrize("motion", MOTIONS)
def test_a_channel_moved_by_a_known_rigid_transform_is_brought_back_within_a_voxel(motion: str) -> None:
    degrees, shift = MOTIONS[motion]
    reference = sample_phantom(REFERENCE, "dwi")
    moving, rotation, translation = moved_channel(degrees, shift)
    fit = register_channel(reference, REFERENCE, moving, MOVING, 1)

    # The fitted transform against the known one, at every brain voxel of the reference grid (computed with numpy).
    points = grid_points(REFERENCE)[reference.ravel() > 0]
    truth = (points - translation) @ rotation  # Q⁻¹(x) = Rᵀ (x - t), row by row
    transform = fit.transform()
    fitted = np.array([transform.TransformPoint(tuple(point)) for point in points[::5]])
    error = np.linalg.norm(fitted - truth[::5], axis=1)
    smallest_voxel = min(REFERENCE.spacing)
    assert error.max() < 1.0 < smallest_voxel, f"{error.max():.2f} mm off"
    # The recorded summary agrees with the truth: the rotation angle of Rᵀ and how far the centre moves.
    true_angle = np.degrees(np.arccos((np.trace(rotation) - 1) / 2))
    center = np.asarray(fit.center)
    assert fit.rotation_degrees == pytest.approx(true_angle, abs=0.5)
    assert fit.shift_mm == pytest.approx(np.linalg.norm((center - translation) @ rotation - center), abs=1.0)
    assert fit.converged and fit.overlap > 0.5 and 0 < fit.iterations < 200 and fit.metric < 0

    # The resampled channel is the FLAIR phantom on the reference grid, as if it had been acquired there.
    resampled = resample_channel(moving, MOVING, fit, REFERENCE)
    expected = sample_phantom(REFERENCE, "flair")
    brain = (reference > 0) & (resampled > 0)
    assert np.corrcoef(resampled[brain], expected[brain])[0, 1] > 0.99
    headers_only = dataclasses.replace(fit, angles=(0.0, 0.0, 0.0), translation=(0.0, 0.0, 0.0))
    by_headers = resample_channel(moving, MOVING, headers_only, REFERENCE)
    registered = np.abs(resampled - expected)[brain].mean()
    unregistered = np.abs(by_headers - expected)[brain].mean()
    assert registered < 0.3 * unregistered, (registered, unregistered)


def test_the_fit_is_the_same_whatever_the_thread_count_and_survives_json() -> None:
    reference = sample_phantom(REFERENCE, "dwi")
    moving, _, _ = moved_channel(*MOTIONS["3-5 degrees, 4-5 mm"])
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    fits = []
    try:
        for count in (1, 2, 8):
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
            fits.append(register_channel(reference, REFERENCE, moving, MOVING, 1))
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    assert fits[1] == fits[0] and fits[2] == fits[0], "bit for bit, every field"
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads
    assert from_plain(ChannelFit, to_plain(fits[0]), "") == fits[0]


def test_channels_on_the_reference_grid_are_kept_and_others_moved() -> None:
    reference = sample_phantom(REFERENCE, "dwi")
    adc = sample_phantom(REFERENCE, "adc")
    flair, _, _ = moved_channel(*MOTIONS["2 degrees, 2 mm"])
    images, fits = coregister_channels([reference, adc, flair], [REFERENCE, REFERENCE, MOVING])
    assert images.shape == (3, *REFERENCE.shape) and images.dtype == np.float32
    np.testing.assert_array_equal(images[0], reference)
    np.testing.assert_array_equal(images[1], adc)
    assert [fit.channel for fit in fits] == [2]
    np.testing.assert_array_equal(images[2], resample_channel(flair, MOVING, fits[0], REFERENCE))


def test_a_channel_that_does_not_overlap_the_reference_fails_in_one_line() -> None:
    reference = sample_phantom(REFERENCE, "dwi")
    moving, _, _ = moved_channel(*MOTIONS["2 degrees, 2 mm"])
    elsewhere = dataclasses.replace(MOVING, origin=tuple(np.asarray(MOVING.origin) + (400.0, 0.0, 0.0)))
    with pytest.raises(RegistrationError) as raised:
        coregister_channels([reference, moving], [REFERENCE, elsewhere], ["in/c_0000.nii.gz", "in/c_0001.nii.gz"])
    message = str(raised.value)
    assert message.startswith("in/c_0001.nii.gz: registration onto c_0000.nii.gz failed: too little overlap")
    assert "covers 0% of channel 0's non-zero region (at least 50% needed)" in message and "\n" not in message
    assert raised.value.file == "in/c_0001.nii.gz"


def test_a_registration_that_does_not_converge_fails_in_one_line() -> None:
    reference = sample_phantom(REFERENCE, "dwi")
    moving, _, _ = moved_channel(*MOTIONS["3-5 degrees, 4-5 mm"])
    with pytest.raises(RegistrationError, match=r"^no convergence: the optimizer reached its limit of 3 iterations"):
        register_channel(reference, REFERENCE, moving, MOVING, 1, iterations=3)


def test_nan_voxels_and_an_empty_reference_are_refused() -> None:
    reference = sample_phantom(REFERENCE, "dwi")
    moving, _, _ = moved_channel(*MOTIONS["2 degrees, 2 mm"])
    moving[0, 0, 0] = np.nan
    with pytest.raises(RegistrationError, match="channel 1 has 1 NaN/Inf voxel"):
        register_channel(reference, REFERENCE, moving, MOVING, 1)
    with pytest.raises(RegistrationError, match="channel 0 is zero everywhere"):
        register_channel(np.zeros_like(reference), REFERENCE, np.nan_to_num(moving), MOVING, 1)
