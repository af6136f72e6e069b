"""A small exact ray tracer for scenes of analytic primitives, vectorised over every ray of every view.

Primitives: boxes, ellipsoids and capped frusta (cylinders and cones), each with its own pose. Shading
is Lambertian with an ambient term under one fixed world light, on a white background. Images are
rendered ``supersample`` x ``supersample`` times denser and box-averaged, which anti-aliases edges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from soda_diffusers.cameras import view_matrices

LIGHT_DIRECTION = np.array([0.45, 0.8, 0.4]) / np.linalg.norm([0.45, 0.8, 0.4])
AMBIENT = 0.38
PRIMITIVE_KINDS = ("box", "ellipsoid", "frustum")


@dataclass
class Primitive:
    """A solid in the pose ``world = rotation @ local + centre``.

    ``size`` is, in the local frame: half extents ``(x, y, z)`` for a box; radii ``(x, y, z)`` for an
    ellipsoid; ``(bottom radius, half height, top radius)`` for a frustum along local y.
    """

    kind: str
    centre: np.ndarray
    size: np.ndarray
    colour: np.ndarray
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self):
        if self.kind not in PRIMITIVE_KINDS:
            raise ValueError(f"kind: expected one of {PRIMITIVE_KINDS}, got {self.kind!r}")
        self.centre = np.asarray(self.centre, dtype=np.float64).reshape(3)
        self.size = np.asarray(self.size, dtype=np.float64).reshape(3)
        self.colour = np.asarray(self.colour, dtype=np.float64).reshape(3)
        self.rotation = np.asarray(self.rotation, dtype=np.float64).reshape(3, 3)

    def half_extents(self) -> np.ndarray:
        """Half extents of the world-axis-aligned bounding box around ``centre``."""
        if self.kind == "box":
            return np.abs(self.rotation) @ self.size
        if self.kind == "ellipsoid":
            return np.sqrt((self.rotation * self.size) ** 2 @ np.ones(3))
        radius, half_height = max(self.size[0], self.size[2]), self.size[1]
        axis = self.rotation[:, 1]
        return np.abs(axis) * half_height + radius * np.sqrt(np.clip(1 - axis**2, 0, None))

    def volume(self) -> float:
        a, b, c = self.size
        if self.kind == "box":
            return 8 * a * b * c
        if self.kind == "ellipsoid":
            return 4 / 3 * math.pi * a * b * c
        return 2 * b * math.pi / 3 * (a * a + a * c + c * c)

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Which of the world ``points`` ``(N, 3)`` lie inside (or on) the solid."""
        local = (np.asarray(points, dtype=np.float64) - self.centre) @ self.rotation
        tolerance = 1e-9
        if self.kind == "box":
            return (np.abs(local) <= self.size + tolerance).all(axis=1)
        if self.kind == "ellipsoid":
            return ((local / self.size) ** 2).sum(axis=1) <= 1 + tolerance
        bottom, half_height, top = self.size
        radius = bottom + (top - bottom) * (local[:, 1] + half_height) / (2 * half_height)
        inside_height = np.abs(local[:, 1]) <= half_height + tolerance
        return inside_height & (local[:, 0] ** 2 + local[:, 2] ** 2 <= radius**2 + tolerance)

    def scaled(self, scale: float, shift: np.ndarray) -> Primitive:
        return Primitive(
            self.kind, self.centre * scale + shift, self.size * scale, self.colour, self.rotation
        )

    def rotated(self, rotation: np.ndarray) -> Primitive:
        return Primitive(self.kind, rotation @ self.centre, self.size, self.colour, rotation @ self.rotation)


def _intersect(primitive: Primitive, origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Entry distance ``t`` (in units of the direction's length) of rays into ``primitive``, inf when
    they miss. ``origins`` and ``directions`` ``(N, 3)``, float32, world frame."""
    rotation = primitive.rotation.astype(np.float32)
    o = (origins - primitive.centre.astype(np.float32)) @ rotation  # local = R^T (p - c), row vectors
    d = directions @ rotation
    ox, oy, oz = o[..., 0], o[..., 1], o[..., 2]
    dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
    if primitive.kind == "box":
        near = np.full(dx.shape, -np.inf, dtype=np.float32)
        far = np.full(dx.shape, np.inf, dtype=np.float32)
        for oc, dc, half in (
            (ox, dx, primitive.size[0]),
            (oy, dy, primitive.size[1]),
            (oz, dz, primitive.size[2]),
        ):
            inverse = 1.0 / dc
            t1 = (-half - oc) * inverse
            t2 = (half - oc) * inverse
            near = np.maximum(near, np.minimum(t1, t2))
            far = np.minimum(far, np.maximum(t1, t2))
        return np.where((far >= near) & (near > 0), near, np.inf)
    if primitive.kind == "ellipsoid":
        rx, ry, rz = primitive.size
        ox, oy, oz, dx, dy, dz = ox / rx, oy / ry, oz / rz, dx / rx, dy / ry, dz / rz
        a = dx * dx + dy * dy + dz * dz
        b = ox * dx + oy * dy + oz * dz
        c = ox * ox + oy * oy + oz * oz - 1.0
        discriminant = b * b - a * c
        t = (-b - np.sqrt(discriminant)) / a
        return np.where((discriminant >= 0) & (t > 0), t, np.inf)
    bottom, half_height, top = primitive.size
    slope = (top - bottom) / (2 * half_height)
    middle = (top + bottom) / 2
    # Lateral surface x^2 + z^2 = r(y)^2 with r(y) = middle + slope * y.
    r_origin = middle + slope * oy
    a = dx * dx + dz * dz - slope * slope * dy * dy
    b = ox * dx + oz * dz - slope * r_origin * dy
    c = ox * ox + oz * oz - r_origin * r_origin
    root = np.sqrt(b * b - a * c)
    best = np.full(dx.shape, np.inf, dtype=np.float32)
    for t in ((-b - root) / a, (-b + root) / a):
        y = oy + t * dy
        valid = (t > 0) & (np.abs(y) <= half_height) & (middle + slope * y >= 0)
        best = np.where(valid & (t < best), t, best)
    for cap_y, cap_radius in ((-half_height, bottom), (half_height, top)):
        t = (cap_y - oy) / dy
        x, z = ox + t * dx, oz + t * dz
        valid = (t > 0) & (x * x + z * z <= cap_radius * cap_radius)
        best = np.where(valid & (t < best), t, best)
    return best


def _normals(primitive: Primitive, points: np.ndarray) -> np.ndarray:
    """Outward unit normals (world) at world ``points`` ``(N, 3)`` on the surface of ``primitive``."""
    local = (points - primitive.centre) @ primitive.rotation
    if primitive.kind == "box":
        scaled = np.abs(local) / primitive.size
        axis = scaled.argmax(axis=1)
        normal = np.zeros_like(local)
        normal[np.arange(len(local)), axis] = np.sign(local[np.arange(len(local)), axis])
    elif primitive.kind == "ellipsoid":
        normal = local / primitive.size**2
    else:
        bottom, half_height, top = primitive.size
        slope = (top - bottom) / (2 * half_height)
        radius = (top + bottom) / 2 + slope * local[:, 1]
        normal = np.stack([local[:, 0], -slope * radius, local[:, 2]], axis=1)
        on_cap = np.abs(local[:, 1]) >= half_height * (1 - 1e-3)
        lateral = np.sqrt(local[:, 0] ** 2 + local[:, 2] ** 2)
        # A point of the rim belongs to the cap when it lies inside the cap's disc.
        on_cap &= lateral <= np.where(local[:, 1] > 0, top, bottom) * (1 - 1e-3) + 1e-6
        normal[on_cap] = np.stack(
            [np.zeros(on_cap.sum()), np.sign(local[on_cap, 1]), np.zeros(on_cap.sum())], axis=1
        )
    normal = normal @ primitive.rotation.T
    return normal / np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)


def camera_rays(cameras, views, size: int, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """World origins ``(V, 3)`` and (unnormalised) directions ``(V, M, 3)`` of ``views``,
    ``M = (size * supersample)^2`` rays per view in row-major subpixel order, float32.

    Subpixels sit symmetrically around the pixel centres of the ``linspace(-1, 1, size)`` convention.
    """
    y, x = np.meshgrid(
        _subpixel_coords(size, supersample), _subpixel_coords(size, supersample), indexing="ij"
    )
    grid = np.stack([x.ravel(), y.ravel(), np.ones(x.size), np.zeros(x.size)])
    origins, directions = [], []
    for view in views:
        _, unprojection = view_matrices(cameras, view)
        directions.append((unprojection @ grid)[:3].T)
        centre = unprojection[:, 3]
        origins.append(centre[:3] / centre[3])
    return np.stack(origins).astype(np.float32), np.stack(directions).astype(np.float32)


def _subpixel_coords(size: int, supersample: int) -> np.ndarray:
    offsets = ((np.arange(supersample) + 0.5) / supersample - 0.5) * (2.0 / (size - 1))
    return (np.linspace(-1.0, 1.0, size)[:, None] + offsets[None, :]).reshape(-1)


def _candidate_rays(primitive: Primitive, projections: np.ndarray, size: int, supersample: int) -> np.ndarray:
    """Flat indices of the rays that can hit ``primitive``: per view, the subpixels inside the
    projection of its bounding box (which contains the projection of the solid)."""
    half = primitive.half_extents()
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
    corners = np.concatenate([primitive.centre + signs * half, np.ones((8, 1))], axis=1)
    projected = np.einsum("vij,cj->vci", projections, corners)
    xy = projected[..., :2] / projected[..., 2:3]
    # Inverse of the subpixel coordinate x(q) of _subpixel_coords, for q = pixel * supersample + k.
    subpixels = size * supersample
    q = ((xy + 1) * (size - 1) / 2 + 0.5) * supersample - 0.5
    low = np.clip(np.floor(q.min(axis=1)) - 1, 0, subpixels).astype(int)
    high = np.clip(np.ceil(q.max(axis=1)) + 2, 0, subpixels).astype(int)
    selected = np.zeros((len(projections), subpixels, subpixels), dtype=bool)
    for view, ((x0, y0), (x1, y1)) in enumerate(zip(low, high)):
        selected[view, y0:y1, x0:x1] = True
    return np.flatnonzero(selected)


class Rig:
    """The rays of some views of a ``cameras.npz`` mapping, computed once for many objects."""

    def __init__(self, cameras, views, size: int = 64, supersample: int = 2):
        self.views = list(views)
        missing = [
            f"{key}_{v}"
            for v in self.views
            for key in ("world_mat", "camera_mat")
            if f"{key}_{v}" not in cameras
        ]
        if missing:
            raise ValueError(
                f"cameras: missing {missing[:4]} (expected world_mat_i and camera_mat_i of views {self.views})"
            )
        self.size, self.supersample = size, supersample
        self.origins, directions = camera_rays(cameras, self.views, size, supersample)
        self.rays_per_view = directions.shape[1]
        self.directions = directions.reshape(-1, 3)
        self.projections = np.stack(
            [
                np.asarray(cameras[f"camera_mat_{v}"], np.float64) @ view_matrices(cameras, v)[0]
                for v in self.views
            ]
        )

    def render(self, primitives: list[Primitive]) -> tuple[np.ndarray, np.ndarray]:
        """RGB images ``(V, size, size, 3)`` and masks ``(V, size, size)`` (the fraction of each pixel
        covered, 0 to 255) of ``primitives``, both uint8."""
        if not primitives:
            raise ValueError("render: expected at least one primitive")
        candidates = [_candidate_rays(p, self.projections, self.size, self.supersample) for p in primitives]
        # Only rays in some primitive's box can hit anything: trace those, leave the rest background.
        active = np.unique(np.concatenate(candidates))
        origins = self.origins[active // self.rays_per_view]
        directions = self.directions[active]
        distances = np.full((len(primitives), len(active)), np.inf, dtype=np.float32)
        for index, (primitive, rays) in enumerate(zip(primitives, candidates)):
            local = np.searchsorted(active, rays)
            # Axis-parallel rays divide by zero and missing rays take square roots of negatives: both
            # give inf or nan distances, which the comparisons treat as misses.
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                distances[index, local] = _intersect(primitive, origins[local], directions[local])
        nearest = distances.argmin(axis=0)
        t = distances[nearest, np.arange(len(active))]
        hit = np.isfinite(t)
        colour = np.ones((len(active), 3), dtype=np.float32)
        for index, primitive in enumerate(primitives):
            selected = np.flatnonzero(hit & (nearest == index))
            if not len(selected):
                continue
            ray_direction = directions[selected].astype(np.float64)
            points = (
                origins[selected].astype(np.float64) + t[selected, None].astype(np.float64) * ray_direction
            )
            normal = _normals(primitive, points)
            # Seen from inside a thin part the outward normal faces away: light the side the camera sees.
            facing = np.sign(-(normal * ray_direction).sum(axis=1, keepdims=True))
            normal = normal * np.where(facing == 0, 1.0, facing)
            diffuse = np.clip(normal @ LIGHT_DIRECTION, 0.0, None)[:, None]
            colour[selected] = primitive.colour * (AMBIENT + (1.0 - AMBIENT) * diffuse)
        image = np.ones((len(self.directions), 3), dtype=np.float32)
        image[active] = colour
        coverage = np.zeros(len(self.directions), dtype=np.float32)
        coverage[active] = hit
        shape = (len(self.views), self.size, self.supersample, self.size, self.supersample)
        samples = self.supersample**2
        image = image.reshape(*shape, 3).sum(axis=(2, 4)) / samples
        coverage = coverage.reshape(shape).sum(axis=(2, 4)) / samples
        return np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), np.rint(coverage * 255).astype(
            np.uint8
        )


def ray_distances(primitives: list[Primitive], origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Distance along each ray (in units of its direction's length) to the first primitive it hits,
    inf where it hits none. ``origins`` and ``directions`` ``(N, 3)``, world frame."""
    origins = np.asarray(origins, dtype=np.float32).reshape(-1, 3)
    directions = np.asarray(directions, dtype=np.float32).reshape(-1, 3)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.min([_intersect(p, origins, directions) for p in primitives], axis=0)


def render(
    primitives: list[Primitive], cameras, views, size: int = 64, supersample: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``primitives`` from ``views`` of ``cameras`` (a ``cameras.npz`` mapping): RGB images
    ``(V, size, size, 3)`` and coverage masks ``(V, size, size)``, uint8. See :class:`Rig` to render
    many objects with the same cameras."""
    return Rig(cameras, views, size, supersample).render(primitives)
