import math

import numpy as np
import pytest
import torch

from soda_diffusers.cameras import (
    NMR_DISTANCE,
    intrinsics_mat,
    nmr_cameras,
    nmr_rays,
    orbit_rays,
    view_matrices,
)
from soda_diffusers.models.modeling_soda import RayEncoding, ray_encoding_channels


def test_nmr_rig_matches_the_dataset_conventions():
    cameras = nmr_cameras()
    assert len([k for k in cameras if k.startswith("world_mat_") and "inv" not in k]) == 24
    assert cameras["camera_mat_0"][0, 0] == pytest.approx(1 / math.tan(math.radians(15)), rel=1e-6)
    for view in range(24):
        world_mat_inv = cameras[f"world_mat_inv_{view}"]
        centre = world_mat_inv[:3, 3]
        assert np.linalg.norm(centre) == pytest.approx(NMR_DISTANCE, rel=1e-5)
        # 30 degrees of elevation in a y-up world.
        assert math.degrees(math.asin(centre[1] / NMR_DISTANCE)) == pytest.approx(30.0, abs=1e-4)
        # OpenCV axes: the object centre projects to the image centre, in front of the camera.
        projected = cameras[f"camera_mat_{view}"] @ cameras[f"world_mat_{view}"] @ np.array([0, 0, 0, 1.0])
        assert projected[2] == pytest.approx(NMR_DISTANCE, rel=1e-5)
        np.testing.assert_allclose(projected[:2] / projected[2], 0, atol=1e-6)
    # Successive views are 15 degrees apart on the orbit.
    c0, c1 = cameras["world_mat_inv_0"][:3, 3], cameras["world_mat_inv_1"][:3, 3]
    cos_el = math.cos(math.radians(30))
    azimuth_step = math.degrees(math.atan2(c1[0], c1[2]) - math.atan2(c0[0], c0[2]))
    assert azimuth_step == pytest.approx(15.0, abs=1e-4)
    assert np.hypot(c0[0], c0[2]) == pytest.approx(NMR_DISTANCE * cos_el, rel=1e-5)


def test_image_y_axis_points_down():
    # A point above the object centre (world +y) must land in the upper half of the image (y < 0).
    cameras = nmr_cameras()
    projected = cameras["camera_mat_3"] @ cameras["world_mat_3"] @ np.array([0, 0.3, 0, 1.0])
    assert projected[1] / projected[2] < 0


@pytest.mark.parametrize("size", [31, 32, 64])
def test_central_ray_passes_through_the_object_centre(size):
    rays = orbit_rays([0.0, 45.0, 180.0], size=size, source_azimuth_deg=30.0)
    pixel_angle = math.radians(30.0) / size
    for ray in rays:
        origin, direction = ray[:3].double(), ray[3:].double()
        # In the source frame the object centre sits at (0, 0, 2.732).
        centre = torch.tensor([0.0, 0.0, NMR_DISTANCE], dtype=torch.float64)
        # Distance of the object centre from the ray through each pixel; the nearest ray is central.
        to_centre = centre[:, None, None] - origin
        along = (to_centre * direction).sum(0)
        miss = (to_centre - along * direction).norm(dim=0)
        i, j = divmod(int(miss.argmin()), size)
        assert abs(i - (size - 1) / 2) <= 0.5 and abs(j - (size - 1) / 2) <= 0.5
        assert miss.min() <= NMR_DISTANCE * pixel_angle


def test_rays_are_relative_to_the_source_camera():
    rays = orbit_rays([30.0], size=16, source_azimuth_deg=30.0)[0]
    # Target == source: the camera sits at the origin looking along +z.
    torch.testing.assert_close(rays[:3], torch.zeros(3, 16, 16), atol=1e-5, rtol=0)
    assert rays[5].min() > 0.9
    # Unit directions everywhere.
    torch.testing.assert_close(rays[3:].norm(dim=0), torch.ones(16, 16))
    # Another camera on the orbit sits 2.732 from the object centre, seen from the source.
    other = orbit_rays([120.0], size=16, source_azimuth_deg=30.0)[0]
    origin = other[:3, 0, 0]
    assert (origin - torch.tensor([0, 0, NMR_DISTANCE])).norm() == pytest.approx(NMR_DISTANCE, rel=1e-5)
    # Relative pose only: rotating the whole rig about the vertical axis changes nothing.
    shifted = orbit_rays([120.0 + 75.0], size=16, source_azimuth_deg=30.0 + 75.0)[0]
    torch.testing.assert_close(other, shifted, atol=1e-5, rtol=0)


def test_orbit_and_nmr_helpers_agree_on_the_nmr_rig():
    cameras = nmr_cameras()
    targets = [0, 1, 7, 23]
    for source in (0, 5):
        expected = orbit_rays([15.0 * t for t in targets], size=8, source_azimuth_deg=15.0 * source)
        torch.testing.assert_close(nmr_rays(cameras, source, targets, 8), expected, atol=1e-5, rtol=0)


def test_nmr_rays_handle_missing_inverse_keys_and_report_bad_cameras():
    cameras = nmr_cameras()
    reduced = {k: v for k, v in cameras.items() if "inv" not in k}
    torch.testing.assert_close(nmr_rays(reduced, 2, [3, 4], 8), nmr_rays(cameras, 2, [3, 4], 8), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="world_mat_30"):
        nmr_rays(cameras, 30, [1], 8)
    broken = dict(cameras, world_mat_1=np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="world_mat_1.*NaN"):
        nmr_rays(broken, 1, [2], 8)
    with pytest.raises(ValueError, match="4x4"):
        view_matrices(dict(cameras, world_mat_0=np.eye(3)), 0)


def test_intrinsics_are_normalised_to_the_unit_square():
    focal = intrinsics_mat(30.0)[0, 0]
    # A point at the half field of view lands on the image border (x = 1).
    x = focal * math.tan(math.radians(15.0))
    assert x == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kind, bands, features, channels", [("sinusoidal", 4, 0, 54), ("sinusoidal", 0, 0, 6), ("plucker", 0, 16, 38), ("plucker", 0, 253, 512)]
)
def test_ray_encodings_are_finite_and_of_the_declared_width(kind, bands, features, channels):
    encoding = RayEncoding(kind, sinusoidal_bands=bands, fourier_features=features)
    rays = orbit_rays([0.0, 90.0], size=8, source_azimuth_deg=10.0)
    encoded = encoding(rays)
    assert ray_encoding_channels(kind, bands, features) == channels == encoding.out_channels
    assert encoded.shape == (2, channels, 8, 8)
    assert torch.isfinite(encoded).all()


def test_plucker_encoding_is_smooth_and_ignores_where_the_origin_sits_on_the_ray():
    encoding = RayEncoding("plucker", fourier_features=8)
    rays = orbit_rays([40.0], size=8)
    slid = rays.clone()
    slid[:, :3] += 0.7 * slid[:, 3:]
    torch.testing.assert_close(encoding(rays), encoding(slid), atol=1e-4, rtol=0)
    # A small camera move makes a small change.
    nearby = orbit_rays([40.5], size=8)
    assert (encoding(rays) - encoding(nearby)).abs().max() < 0.5


def test_unknown_ray_encoding_is_rejected():
    with pytest.raises(ValueError, match="ray_encoding"):
        RayEncoding("spherical")
