"""The signed surface-distance channel: hand-computed distances on a known ellipsoid, signs, edge cases."""

import math

import torch

from fmc.distance import (
    DISTANCE_GRID,
    DISTANCE_UNIT_UM,
    coarse_distance_channel,
    signed_hull_distance,
)

SPACING = (1.0, 0.5, 0.5)  # um per voxel along z, y, x: anisotropic, so the um conversion is tested
SHAPE = (41, 81, 61)
CENTRE = (20, 40, 30)  # a voxel index; the ellipsoid's tips then lie on voxel centres
SEMI_AXES_UM = (15.0, 12.0, 9.0)  # z, y, x


def _ellipsoid() -> torch.Tensor:
    """0.9 inside the ellipsoid, 0.1 outside."""
    axes = [
        (torch.arange(n, dtype=torch.float64) - c) * s / a
        for n, c, s, a in zip(SHAPE, CENTRE, SPACING, SEMI_AXES_UM, strict=True)
    ]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.where(z**2 + y**2 + x**2 <= 1, 0.9, 0.1).float()


def test_distance_to_a_known_ellipsoid_at_hand_computed_points():
    distance = signed_hull_distance(_ellipsoid(), SPACING)
    cz, cy, cx = CENTRE
    voxel = max(SPACING)  # the hull of voxel centres lies inside the true surface by under a voxel
    # centre: the nearest surface point is the tip of the shortest semi-axis, 9 um away
    assert abs(float(distance[cz, cy, cx]) - 9.0) <= voxel
    # 4 um along x from the centre: 9 - 4 = 5 um from the x tip (the nearest point on the minor axis)
    assert abs(float(distance[cz, cy, cx + 8]) - 5.0) <= voxel
    # on the x tip itself: 0
    assert abs(float(distance[cz, cy, cx + 18])) <= voxel
    # outside, 3 um beyond the x tip: -3
    assert abs(float(distance[cz, cy, cx + 24]) + 3.0) <= voxel
    # outside, 4 um beyond the z tip (4 planes of 1 um): -4
    assert abs(float(distance[cz + 19, cy, cx]) + 4.0) <= voxel


def test_distance_is_positive_inside_and_negative_outside():
    volume = _ellipsoid()
    distance = signed_hull_distance(volume, SPACING)
    inside = volume > 0.5
    assert float(distance[inside].min()) >= -1e-6  # hull voxels: 0 on the surface, positive within
    assert float(distance[~inside].max()) <= max(SPACING)  # the voxel layer just outside the hull
    assert float(distance[0, 0, 0]) < -10.0  # a corner is far outside
    assert distance.shape == volume.shape and distance.dtype == torch.float32


def test_no_hull_gives_a_zero_channel():
    flat = torch.zeros(8, 8, 8)
    assert torch.equal(signed_hull_distance(flat, (1.0, 1.0, 1.0)), flat)  # nothing above the threshold
    plane = torch.zeros(8, 8, 8)
    plane[4] = 1.0  # one plane of foreground: no 3-D hull
    assert torch.equal(signed_hull_distance(plane, (1.0, 1.0, 1.0)), torch.zeros(8, 8, 8))


def test_coarse_channel_is_in_network_units_on_the_coarse_cube():
    iso = _ellipsoid()  # pretend this is the 0.6 um grid: the channel sees the specimen's um size
    channel = coarse_distance_channel(iso, 0.6)
    assert channel.shape == (DISTANCE_GRID,) * 3
    # the deepest point lies the shortest semi-axis inside: in voxels as drawn, in um at 0.6 um each
    semi_axes_voxels = [a / s for a, s in zip(SEMI_AXES_UM, SPACING, strict=True)]
    expected = min(v * 0.6 for v in semi_axes_voxels) / DISTANCE_UNIT_UM
    coarse_voxel = max(n * 0.6 / DISTANCE_GRID for n in iso.shape) / DISTANCE_UNIT_UM
    assert math.isclose(float(channel.max()), expected, abs_tol=2 * coarse_voxel)
    assert float(channel.min()) < 0
