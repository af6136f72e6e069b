"""NMR cameras and per-pixel rays, expressed relative to the source camera.

Conventions (those of the NMR ``cameras.npz`` files, DVR/SRT style):

* ``world_mat`` maps world to camera coordinates (4x4). Camera axes are OpenCV's:
  x right, y down, looking along +z. The NMR world is y-up.
* ``camera_mat`` holds normalised intrinsics, ``diag(f, f, 1, 1)`` with ``f = 1 / tan(fov / 2)``,
  so that ``p = camera_mat @ world_mat @ p_world`` projects to ``(p_x / p_z, p_y / p_z)`` in
  [-1, 1], [-1, -1] being the top-left corner.
* Pixel centres: pixel ``(row i, column j)`` of an ``H x W`` image sits at
  ``x = linspace(-1, 1, W)[j]``, ``y = linspace(-1, 1, H)[i]`` (the corner pixels' centres lie
  on the image border). Every function in the package uses this one convention.

Rays are ``[origin, direction]`` stacked as ``(N, 6, H, W)`` and expressed in the frame of the
*source* camera: points are mapped by the source view's ``world_mat``, so the source camera sits at
the origin looking along +z and an object centred at the world origin lies at ``(0, 0, distance)``.
Expressing targets relative to the source tells the model how the camera moved, rather than
which absolute view id it is looking from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

# camera_rays, the one ray function, lives beside the models, whose exported file must stand alone. Imported
# relatively, as the demo's modules are: a Space ships this module and that one as they are (hub.space).
from .models.modeling_soda import camera_rays

NMR_NUM_VIEWS = 24
NMR_AZIMUTH_STEP_DEG = 15.0
NMR_ELEVATION_DEG = 30.0
NMR_DISTANCE = 2.732
NMR_FOV_DEG = 30.0
CAMERA_KEYS = ("world_mat", "world_mat_inv", "camera_mat", "camera_mat_inv")


def look_at_world_mat(azimuth_deg: float, elevation_deg: float, distance: float) -> np.ndarray:
    """World-to-camera matrix (OpenCV axes) of a camera on a sphere around the origin, y-up world."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    centre = distance * np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
    forward = -centre / np.linalg.norm(centre)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rotation = np.stack([right, down, forward])
    world_mat = np.eye(4)
    world_mat[:3, :3] = rotation
    world_mat[:3, 3] = -rotation @ centre
    return world_mat


def intrinsics_mat(fov_deg: float) -> np.ndarray:
    focal = 1.0 / math.tan(math.radians(fov_deg) / 2)
    return np.diag([focal, focal, 1.0, 1.0])


def nmr_cameras(
    azimuths_deg: Sequence[float] | None = None,
    *,
    elevation_deg: float = NMR_ELEVATION_DEG,
    distance: float = NMR_DISTANCE,
    fov_deg: float = NMR_FOV_DEG,
) -> dict[str, np.ndarray]:
    """The NMR rig as a ``cameras.npz`` mapping (``world_mat_i``, ``world_mat_inv_i``, ...).

    By default 24 views at azimuths 0, 15, ..., 345 degrees.
    """
    if azimuths_deg is None:
        azimuths_deg = [NMR_AZIMUTH_STEP_DEG * i for i in range(NMR_NUM_VIEWS)]
    camera_mat = intrinsics_mat(fov_deg)
    cameras = {}
    for i, azimuth in enumerate(azimuths_deg):
        world_mat = look_at_world_mat(azimuth, elevation_deg, distance)
        cameras[f"world_mat_{i}"] = world_mat.astype(np.float32)
        cameras[f"world_mat_inv_{i}"] = np.linalg.inv(world_mat).astype(np.float32)
        cameras[f"camera_mat_{i}"] = camera_mat.astype(np.float32)
        cameras[f"camera_mat_inv_{i}"] = np.linalg.inv(camera_mat).astype(np.float32)
    return cameras


def _camera_matrix(cameras: Mapping, key: str) -> np.ndarray:
    if key not in cameras:
        available = sorted(k for k in cameras.keys() if not k.startswith("__"))
        shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
        raise ValueError(f"cameras: missing key '{key}' (found {len(available)} keys: {shown or 'none'})")
    matrix = np.asarray(cameras[key], dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"cameras['{key}']: expected a 4x4 matrix, got shape {tuple(matrix.shape)}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"cameras['{key}']: contains NaN or inf")
    return matrix


def view_matrices(cameras: Mapping, view: int) -> tuple[np.ndarray, np.ndarray]:
    """``(world_mat, world_mat_inv @ camera_mat_inv)`` of one view of a ``cameras.npz`` mapping."""
    world_mat = _camera_matrix(cameras, f"world_mat_{view}")
    inv_key = f"world_mat_inv_{view}"
    world_mat_inv = _camera_matrix(cameras, inv_key) if inv_key in cameras else np.linalg.inv(world_mat)
    inv_key = f"camera_mat_inv_{view}"
    if inv_key in cameras:
        camera_mat_inv = _camera_matrix(cameras, inv_key)
    else:
        camera_mat_inv = np.linalg.inv(_camera_matrix(cameras, f"camera_mat_{view}"))
    return world_mat, world_mat_inv @ camera_mat_inv


def nmr_rays(cameras: Mapping, source_view: int, target_views: Sequence[int], size: int) -> torch.Tensor:
    """Rays ``(len(target_views), 6, size, size)`` of ``target_views`` of an NMR ``cameras.npz``
    mapping, in the frame of camera ``source_view``."""
    source_world_mat, _ = view_matrices(cameras, source_view)
    unprojections = np.stack([view_matrices(cameras, int(view))[1] for view in target_views])
    return camera_rays(torch.from_numpy(source_world_mat).expand(len(unprojections), 4, 4), unprojections, size)


def orbit_rays(
    azimuths_deg: Sequence[float] | float,
    *,
    elevation_deg: float = NMR_ELEVATION_DEG,
    distance: float = NMR_DISTANCE,
    fov_deg: float = NMR_FOV_DEG,
    size: int = 32,
    source_azimuth_deg: float = 0.0,
) -> torch.Tensor:
    """Rays ``(N, 6, size, size)`` of cameras orbiting the origin at ``azimuths_deg``, in the frame
    of a source camera at ``source_azimuth_deg`` on the same orbit."""
    if isinstance(azimuths_deg, (int, float)):
        azimuths_deg = [azimuths_deg]
    azimuths = [float(a) for a in np.asarray(azimuths_deg, dtype=np.float64).reshape(-1)]
    azimuths.insert(0, float(source_azimuth_deg))
    cameras = nmr_cameras(azimuths, elevation_deg=elevation_deg, distance=distance, fov_deg=fov_deg)
    return nmr_rays(cameras, 0, range(1, len(azimuths)), size)
