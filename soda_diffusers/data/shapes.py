"""Procedural shapes for the 13 NMR categories, built from boxes, ellipsoids and frusta.

Each category has its structure (a chair has a seat, a back and legs; a lamp a base, a pole and a
shade) and several factors of variation: proportions, one colour per part, optional parts, variants
(a round or a rectangular table) and the yaw about the vertical axis. Objects are built y-up with their
front along +x, turned, then centred and scaled like ShapeNet models: bounding box centred on the
origin with a diagonal of 1, so every object lies inside the sphere of radius 0.5 (and well inside
the unit sphere), filling roughly 30-60% of the width of a 30-degree NMR view from distance 2.732.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np

from soda_diffusers.data.raytrace import Primitive

BOUNDING_BOX_DIAGONAL = 1.0


def rotation_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)


def rotation_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float64)


def rotation_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)


# Rotations taking a frustum's local y axis onto the world x or z axis.
ALONG_X = rotation_z(-math.pi / 2)
ALONG_Z = rotation_x(math.pi / 2)


@dataclass
class SyntheticShape:
    """One procedural object: its category and primitives, in the world frame of the NMR cameras."""

    category: str
    primitives: list[Primitive]

    def bounding_radius(self) -> float:
        """Radius of a sphere around the origin holding the whole object."""
        corners = [np.abs(p.centre) + p.half_extents() for p in self.primitives]
        return float(np.linalg.norm(np.max(corners, axis=0)))

    def anchor_point(self) -> np.ndarray:
        """A point inside the object: the centre of its largest primitive."""
        return max(self.primitives, key=lambda p: p.volume()).centre.copy()

    def contains(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return np.any([p.contains(points) for p in self.primitives], axis=0)


class _Parts:
    """Collects primitives while a shape is built."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.primitives = []

    def u(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)

    def colour(self, hue=None, saturation=(0.35, 0.9), value=(0.45, 0.95)) -> np.ndarray:
        hue = self.rng.random() if hue is None else hue % 1.0
        return np.array(colorsys.hsv_to_rgb(hue, self.u(*saturation), self.u(*value)))

    def grey(self, low: float, high: float) -> np.ndarray:
        return np.full(3, self.u(low, high))

    def box(self, centre, half, colour, rotation=None):
        self.primitives.append(
            Primitive("box", centre, half, colour, np.eye(3) if rotation is None else rotation)
        )

    def ellipsoid(self, centre, radii, colour, rotation=None):
        self.primitives.append(
            Primitive("ellipsoid", centre, radii, colour, np.eye(3) if rotation is None else rotation)
        )

    def frustum(self, centre, bottom, half_height, top, colour, rotation=None):
        self.primitives.append(
            Primitive(
                "frustum",
                centre,
                (bottom, half_height, top),
                colour,
                np.eye(3) if rotation is None else rotation,
            )
        )

    def cylinder(self, centre, radius, half_height, colour, rotation=None):
        self.frustum(centre, radius, half_height, radius, colour, rotation)


def _airplane(p: _Parts):
    length = p.u(1.6, 2.4)
    radius = length * p.u(0.045, 0.08)
    body = p.grey(0.75, 0.95) if p.chance(0.5) else p.colour(saturation=(0.1, 0.5), value=(0.6, 0.95))
    accent = p.colour()
    p.ellipsoid((0, 0, 0), (length / 2, radius, radius), body)
    span = length * p.u(0.75, 1.15)
    chord = length * p.u(0.1, 0.2)
    sweep = math.radians(p.u(0, 35))
    wing_x, wing_y = length * p.u(-0.08, 0.12), radius * p.u(-0.6, 0.4)
    wing_colour = body if p.chance(0.6) else accent
    for side in (1, -1):
        p.box(
            (wing_x - math.sin(sweep) * span / 4, wing_y, side * math.cos(sweep) * span / 4),
            (chord / 2, radius * 0.18, span / 4),
            wing_colour,
            rotation_y(-side * sweep),
        )
    tail_x = -length * 0.42
    tail_span = span * p.u(0.28, 0.42)
    for side in (1, -1):
        p.box(
            (tail_x - math.sin(sweep) * tail_span / 4, radius * 0.3, side * math.cos(sweep) * tail_span / 4),
            (chord * 0.3, radius * 0.12, tail_span / 4),
            wing_colour,
            rotation_y(-side * sweep),
        )
    fin_height = length * p.u(0.1, 0.18)
    p.box(
        (tail_x, radius * 0.6 + fin_height / 2, 0),
        (chord * 0.35, fin_height / 2, radius * 0.12),
        accent,
        rotation_z(-sweep * 0.7),
    )
    if p.chance(0.65):
        engines = 2 if p.chance(0.7) else 4
        for k in range(engines):
            fraction = 0.25 if engines == 2 else (0.2, 0.38)[k // 2]
            side = 1 if k % 2 == 0 else -1
            z = side * span / 2 * fraction * 2
            x = wing_x - math.sin(sweep) * abs(z) + chord * 0.15
            p.cylinder((x, wing_y - radius * 0.55, z), radius * 0.4, chord * 0.45, p.grey(0.3, 0.6), ALONG_X)


def _bench(p: _Parts):
    length, depth, height = p.u(1.5, 2.3), p.u(0.35, 0.6), p.u(0.4, 0.6)
    thickness = p.u(0.04, 0.08)
    wood = p.colour(hue=p.u(0.05, 0.11), saturation=(0.4, 0.8), value=(0.35, 0.8))
    frame = p.grey(0.1, 0.5) if p.chance(0.6) else wood
    p.box((0, height, 0), (depth / 2, thickness / 2, length / 2), wood)
    if p.chance(0.5):
        for x in (1, -1):
            for z in (1, -1):
                p.box(
                    (x * (depth / 2 - 0.05), height / 2, z * (length / 2 - 0.08)),
                    (0.03, height / 2, 0.03),
                    frame,
                )
    else:
        for z in (1, -1):
            p.box((0, height / 2, z * (length / 2 - 0.06)), (depth / 2 * 0.95, height / 2, 0.03), frame)
    if p.chance(0.65):
        back_height = p.u(0.25, 0.5)
        tilt = math.radians(p.u(0, 15))
        p.box(
            (-depth / 2 - math.sin(tilt) * back_height / 2, height + back_height / 2, 0),
            (thickness / 2, back_height / 2, length / 2),
            wood,
            rotation_z(tilt),
        )


def _cabinet(p: _Parts):
    depth, height, width = p.u(0.4, 0.8), p.u(0.7, 1.9), p.u(0.6, 1.5)
    body = p.colour(saturation=(0.1, 0.6), value=(0.35, 0.95))
    door = body * p.u(0.75, 0.95) if p.chance(0.6) else p.colour()
    lift = p.u(0.05, 0.2) if p.chance(0.4) else 0.0
    p.box((0, lift + height / 2, 0), (depth / 2, height / 2, width / 2), body)
    if lift:
        for x in (1, -1):
            for z in (1, -1):
                p.box(
                    (x * (depth / 2 - 0.04), lift / 2, z * (width / 2 - 0.04)),
                    (0.03, lift / 2, 0.03),
                    p.grey(0.1, 0.3),
                )
    handle = p.grey(0.2, 0.8)
    if p.chance(0.5):
        doors = int(p.rng.integers(1, 4))
        door_width = width / doors
        for k in range(doors):
            z = -width / 2 + door_width * (k + 0.5)
            p.box(
                (depth / 2 + 0.01, lift + height / 2, z),
                (0.012, height / 2 - 0.04, door_width / 2 - 0.025),
                door,
            )
            p.ellipsoid(
                (depth / 2 + 0.035, lift + height * 0.55, z + door_width * 0.3), (0.025, 0.025, 0.025), handle
            )
    else:
        drawers = int(p.rng.integers(2, 6))
        drawer_height = height / drawers
        for k in range(drawers):
            y = lift + drawer_height * (k + 0.5)
            p.box((depth / 2 + 0.01, y, 0), (0.012, drawer_height / 2 - 0.02, width / 2 - 0.03), door)
            p.box((depth / 2 + 0.035, y, 0), (0.015, 0.015, width * 0.12), handle)


def _car(p: _Parts):
    length = p.u(1.8, 2.4)
    width = length * p.u(0.38, 0.46)
    wheel = length * p.u(0.075, 0.1)
    body_height = length * p.u(0.11, 0.17)
    paint = p.colour(saturation=(0.2, 0.95), value=(0.3, 0.95))
    glass = p.grey(0.12, 0.3)
    body_bottom = wheel * 0.7
    p.box((0, body_bottom + body_height / 2, 0), (length / 2, body_height / 2, width / 2), paint)
    top = body_bottom + body_height
    if p.chance(0.2):
        # A truck: cab at the front, cargo box behind.
        cab_length = length * 0.3
        p.box(
            (length / 2 - cab_length / 2, top + body_height * 0.6, 0),
            (cab_length / 2, body_height * 0.6, width * 0.45),
            glass,
        )
        p.box(
            (-length * 0.15, top + body_height * 0.8, 0),
            (length * 0.33, body_height * 0.8, width / 2),
            p.colour(),
        )
    else:
        cabin_length = length * p.u(0.38, 0.6)
        cabin_height = length * p.u(0.08, 0.14)
        cabin_x = length * p.u(-0.12, 0.05)
        p.box((cabin_x, top + cabin_height / 2, 0), (cabin_length / 2, cabin_height / 2, width * 0.43), glass)
        p.box((cabin_x, top + cabin_height + 0.012, 0), (cabin_length / 2 * 0.85, 0.014, width * 0.42), paint)
        if p.chance(0.25):
            p.box((-length / 2 + 0.06, top + 0.06, 0), (0.05, 0.012, width / 2), paint)
    axle = length * p.u(0.29, 0.36)
    tyre = p.grey(0.05, 0.18)
    for x in (axle, -axle):
        for z in (1, -1):
            p.cylinder((x, wheel, z * (width / 2 - wheel * 0.25)), wheel, width * 0.08, tyre, ALONG_Z)


def _chair(p: _Parts):
    width, depth = p.u(0.8, 1.1), p.u(0.75, 1.05)
    seat_height, thickness = p.u(0.8, 1.1), p.u(0.06, 0.14)
    upholstery = p.colour()
    back_colour = upholstery if p.chance(0.7) else p.colour()
    legs = p.grey(0.1, 0.7) if p.chance(0.5) else p.colour(hue=p.u(0.05, 0.11), value=(0.3, 0.7))
    p.box((0, seat_height, 0), (depth / 2, thickness / 2, width / 2), upholstery)
    back_height = p.u(0.6, 1.2)
    tilt = math.radians(p.u(0, 18))
    p.box(
        (-depth / 2 - math.sin(tilt) * back_height / 2, seat_height + back_height / 2, 0),
        (0.05, back_height / 2, width / 2 * p.u(0.8, 1.0)),
        back_colour,
        rotation_z(tilt),
    )
    if p.chance(0.25):
        # An office chair: a column on a disc.
        p.cylinder((0, seat_height / 2, 0), 0.05, seat_height / 2, legs)
        p.cylinder((0, 0.04, 0), depth * 0.45, 0.04, legs)
    else:
        leg = p.u(0.03, 0.06)
        round_legs = p.chance(0.5)
        for x in (1, -1):
            for z in (1, -1):
                centre = (x * (depth / 2 - leg * 1.5), seat_height / 2, z * (width / 2 - leg * 1.5))
                if round_legs:
                    p.cylinder(centre, leg, seat_height / 2, legs)
                else:
                    p.box(centre, (leg, seat_height / 2, leg), legs)
    if p.chance(0.35):
        for z in (1, -1):
            p.box(
                (0, seat_height + 0.25, z * (width / 2 + 0.03)), (depth / 2 * 0.85, 0.035, 0.045), back_colour
            )
            p.box((depth * 0.3, seat_height + 0.12, z * (width / 2 + 0.03)), (0.03, 0.12, 0.03), legs)


def _display(p: _Parts):
    width = p.u(1.2, 1.9)
    height = width * p.u(0.5, 0.8)
    thickness = p.u(0.04, 0.12)
    frame = p.grey(0.05, 0.35) if p.chance(0.7) else p.grey(0.7, 0.95)
    neck_height = p.u(0.15, 0.45)
    tilt = math.radians(p.u(-12, 8))
    centre_y = neck_height + height / 2
    p.box((0, centre_y, 0), (thickness / 2, height / 2, width / 2), frame, rotation_z(tilt))
    screen = p.colour(hue=p.u(0.5, 0.7), saturation=(0.2, 0.7), value=(0.15, 0.5))
    offset = np.array([thickness / 2 + 0.005, 0, 0])
    p.box(
        np.array([0, centre_y, 0]) + rotation_z(tilt) @ offset,
        (0.006, height / 2 * 0.9, width / 2 * 0.93),
        screen,
        rotation_z(tilt),
    )
    p.box((-thickness, neck_height / 2 + 0.02, 0), (0.03, neck_height / 2 + 0.02, 0.06), frame)
    if p.chance(0.5):
        p.box((-thickness, 0.015, 0), (0.22, 0.015, width * 0.22), frame)
    else:
        p.cylinder((-thickness, 0.015, 0), width * 0.2, 0.015, frame)


def _lamp(p: _Parts):
    metal = p.grey(0.1, 0.8)
    base_radius = p.u(0.2, 0.4)
    if p.chance(0.6):
        p.cylinder((0, 0.03, 0), base_radius, 0.03, metal)
    else:
        p.frustum((0, 0.05, 0), base_radius, 0.05, base_radius * 0.5, metal)
    pole_height = p.u(0.9, 1.8)
    lean = math.radians(p.u(10, 35)) if p.chance(0.3) else 0.0
    pole_rotation = rotation_z(lean)
    top = pole_rotation @ np.array([0, pole_height, 0])
    p.cylinder(
        pole_rotation @ np.array([0, pole_height / 2, 0]),
        p.u(0.015, 0.035),
        pole_height / 2,
        metal,
        pole_rotation,
    )
    shade_bottom = p.u(0.25, 0.5)
    shade_half = p.u(0.12, 0.3)
    shade = p.colour(saturation=(0.1, 0.8), value=(0.75, 1.0))
    if p.chance(0.8):
        p.frustum(
            top + np.array([0, shade_half * 0.6, 0]),
            shade_bottom,
            shade_half,
            shade_bottom * p.u(0.35, 0.8),
            shade,
        )
    else:
        p.ellipsoid(
            top + np.array([0, shade_half * 0.6, 0]),
            (shade_bottom * 0.7, shade_half, shade_bottom * 0.7),
            shade,
        )
    if p.chance(0.5):
        p.ellipsoid(top - np.array([0, 0.05, 0]), (0.08, 0.08, 0.08), np.array([1.0, 0.95, 0.7]))


def _loudspeaker(p: _Parts):
    depth, height, width = p.u(0.45, 0.8), p.u(0.9, 1.9), p.u(0.45, 0.9)
    cabinet = p.grey(0.05, 0.3) if p.chance(0.6) else p.colour(hue=p.u(0.05, 0.11), value=(0.3, 0.8))
    lift = 0.06 if p.chance(0.4) else 0.0
    p.box((0, lift + height / 2, 0), (depth / 2, height / 2, width / 2), cabinet)
    cone = p.grey(0.3, 0.7) if p.chance(0.6) else p.colour(value=(0.3, 0.9))
    drivers = int(p.rng.integers(1, 4))
    radii = sorted((width / 2 * p.u(0.25, 0.8) for _ in range(drivers)), reverse=True)
    free = height - 2 * sum(radii)
    y = lift + max(free, 0) / (drivers + 1)
    for radius in radii:
        y += radius
        p.cylinder((depth / 2 + 0.015, y, 0), radius, 0.015, cone, ALONG_X)
        y += radius + max(free, 0) / (drivers + 1)
    if lift:
        for z in (1, -1):
            p.box((0, lift / 2, z * width * 0.35), (depth / 2 * 0.9, lift / 2, 0.04), p.grey(0.05, 0.2))


def _rifle(p: _Parts):
    length = p.u(2.2, 3.0)
    metal = p.grey(0.08, 0.35)
    stock_colour = p.colour(hue=p.u(0.04, 0.1), value=(0.25, 0.6)) if p.chance(0.5) else metal
    receiver = length * p.u(0.25, 0.35)
    height = length * p.u(0.04, 0.06)
    p.box((0, 0, 0), (receiver / 2, height / 2, length * 0.014), metal)
    barrel = length * p.u(0.3, 0.42)
    p.cylinder(
        (receiver / 2 + barrel / 2, height * 0.15, 0), length * p.u(0.007, 0.012), barrel / 2, metal, ALONG_X
    )
    stock = length * p.u(0.25, 0.33)
    drop = math.radians(p.u(4, 14))
    p.box(
        (-receiver / 2 - math.cos(drop) * stock / 2, -math.sin(drop) * stock / 2, 0),
        (stock / 2, height * p.u(0.6, 0.9), length * 0.015),
        stock_colour,
        rotation_z(drop),
    )
    p.box(
        (-receiver * 0.35, -height * 1.2, 0),
        (height * 0.3, height * 0.8, length * 0.012),
        stock_colour,
        rotation_z(math.radians(20)),
    )
    if p.chance(0.5):
        p.cylinder((0, height * 1.3, 0), height * 0.35, receiver * 0.4, metal, ALONG_X)
    if p.chance(0.6):
        p.box(
            (receiver * 0.2, -height * 1.4, 0),
            (height * 0.35, height * 1.0, length * 0.011),
            metal,
            rotation_z(math.radians(-10)),
        )


def _sofa(p: _Parts):
    width, depth = p.u(1.6, 2.7), p.u(0.8, 1.15)
    seat = p.u(0.35, 0.5)
    fabric = p.colour(saturation=(0.15, 0.8), value=(0.3, 0.9))
    p.box((0, seat / 2 + 0.05, 0), (depth / 2, seat / 2, width / 2), fabric)
    back_height = p.u(0.35, 0.7)
    p.box((-depth / 2 + 0.1, seat + 0.05 + back_height / 2, 0), (0.1, back_height / 2, width / 2), fabric)
    arm_height = p.u(0.12, 0.35)
    arm = p.u(0.08, 0.18)
    if p.chance(0.85):
        for z in (1, -1):
            p.box(
                (0, seat + 0.05 + arm_height / 2, z * (width / 2 - arm)),
                (depth / 2, arm_height / 2, arm),
                fabric,
            )
    if p.chance(0.5):
        cushion = fabric * p.u(0.8, 1.0) if p.chance(0.6) else p.colour()
        count = int(p.rng.integers(2, 4))
        inner = width - 2 * arm
        for k in range(count):
            z = -inner / 2 + inner / count * (k + 0.5)
            p.box((0.05, seat + 0.09, z), (depth / 2 - 0.12, 0.04, inner / count / 2 - 0.02), cushion)
    if p.chance(0.2):
        p.box(
            (depth * 0.6, seat / 2 + 0.05, width / 2 - depth * 0.4),
            (depth * 0.4, seat / 2, depth * 0.4),
            fabric,
        )
    feet = p.grey(0.05, 0.4)
    for x in (1, -1):
        for z in (1, -1):
            p.box((x * (depth / 2 - 0.06), 0.025, z * (width / 2 - 0.06)), (0.03, 0.025, 0.03), feet)


def _table(p: _Parts):
    height = p.u(0.55, 1.0)
    thickness = p.u(0.04, 0.09)
    top_colour = p.colour(saturation=(0.1, 0.7), value=(0.35, 0.95))
    legs = top_colour if p.chance(0.5) else p.grey(0.1, 0.7)
    if p.chance(0.35):
        radius = p.u(0.5, 0.9)
        p.cylinder((0, height, 0), radius, thickness / 2, top_colour)
        p.cylinder((0, height / 2, 0), p.u(0.04, 0.09), height / 2, legs)
        p.cylinder((0, 0.02, 0), radius * p.u(0.3, 0.6), 0.02, legs)
        return
    length, width = p.u(1.2, 2.3), p.u(0.6, 1.2)
    p.box((0, height, 0), (length / 2, thickness / 2, width / 2), top_colour)
    leg = p.u(0.03, 0.07)
    inset = p.u(0.0, 0.15)
    for x in (1, -1):
        for z in (1, -1):
            p.box(
                (x * (length / 2 - leg - inset), height / 2, z * (width / 2 - leg - inset)),
                (leg, height / 2, leg),
                legs,
            )
    if p.chance(0.25):
        p.box((0, height * 0.3, 0), (length / 2 - leg - inset, 0.02, width / 2 - leg - inset), legs)


def _telephone(p: _Parts):
    body = p.grey(0.05, 0.3) if p.chance(0.5) else p.colour(value=(0.4, 0.95))
    if p.chance(0.25):
        # A desk phone: a sloped base and a handset on top.
        length, width = p.u(0.8, 1.1), p.u(0.7, 1.0)
        p.box((0, 0.12, 0), (length / 2, 0.12, width / 2), body, rotation_z(math.radians(-8)))
        p.ellipsoid((0, 0.32, 0), (0.1, 0.08, width * 0.55), body)
        p.box(
            (length * 0.15, 0.26, 0),
            (length * 0.2, 0.01, width * 0.3),
            p.grey(0.6, 0.9),
            rotation_z(math.radians(-8)),
        )
        return
    height = p.u(1.0, 1.6)
    width = height * p.u(0.45, 0.62)
    thickness = p.u(0.06, 0.14)
    tilt = math.radians(p.u(0, 20))
    rotation = rotation_z(tilt)
    centre = np.array([0, height / 2, 0])
    p.box(centre, (thickness / 2, height / 2, width / 2), body, rotation)
    screen = p.colour(hue=p.u(0.5, 0.7), saturation=(0.1, 0.6), value=(0.05, 0.35))
    p.box(
        centre + rotation @ np.array([thickness / 2 + 0.005, height * 0.03, 0]),
        (0.006, height * 0.4, width * 0.44),
        screen,
        rotation,
    )
    if p.chance(0.5):
        p.cylinder(
            centre + rotation @ np.array([thickness / 2 + 0.005, -height * 0.45, 0]),
            width * 0.07,
            0.008,
            p.grey(0.4, 0.8),
            rotation @ ALONG_X,
        )


def _watercraft(p: _Parts):
    length = p.u(1.8, 2.6)
    width = length * p.u(0.18, 0.32)
    hull_height = length * p.u(0.07, 0.12)
    hull = p.colour(saturation=(0.2, 0.9), value=(0.3, 0.95))
    deck = p.grey(0.75, 0.98) if p.chance(0.6) else p.colour()
    p.ellipsoid((0, 0, 0), (length / 2, hull_height, width / 2), hull)
    p.box((-length * 0.02, hull_height * 0.55, 0), (length * 0.38, hull_height * 0.25, width * 0.3), deck)
    if p.chance(0.55):
        # A sailing boat: mast and sail.
        mast = length * p.u(0.35, 0.6)
        x = length * p.u(0.0, 0.15)
        p.cylinder((x, hull_height + mast / 2, 0), length * 0.008, mast / 2, p.grey(0.3, 0.8))
        if p.chance(0.8):
            p.box(
                (x - length * 0.13, hull_height + mast * 0.5, 0),
                (length * 0.12, mast * 0.4, 0.008),
                p.grey(0.85, 1.0),
            )
    else:
        # A motor boat or a ship: superstructure, maybe a funnel.
        cabin = length * p.u(0.15, 0.3)
        cabin_height = length * p.u(0.06, 0.12)
        x = length * p.u(-0.2, 0.1)
        p.box((x, hull_height * 0.8 + cabin_height / 2, 0), (cabin / 2, cabin_height / 2, width * 0.25), deck)
        if p.chance(0.5):
            p.frustum(
                (x - cabin * 0.2, hull_height * 0.8 + cabin_height * 1.3, 0),
                width * 0.12,
                cabin_height * 0.4,
                width * 0.1,
                p.colour(),
            )


BUILDERS = {
    "02691156": _airplane,
    "02828884": _bench,
    "02933112": _cabinet,
    "02958343": _car,
    "03001627": _chair,
    "03211117": _display,
    "03636649": _lamp,
    "03691459": _loudspeaker,
    "04090263": _rifle,
    "04256520": _sofa,
    "04379243": _table,
    "04401088": _telephone,
    "04530566": _watercraft,
}


def build_shape(category: str, rng: np.random.Generator) -> SyntheticShape:
    """A random object of ``category`` (a synset id), turned about y, centred and normalised."""
    if category not in BUILDERS:
        raise ValueError(f"category: expected one of the NMR synset ids {sorted(BUILDERS)}, got {category!r}")
    parts = _Parts(rng)
    BUILDERS[category](parts)
    yaw = rotation_y(rng.uniform(0, 2 * math.pi))
    primitives = [primitive.rotated(yaw) for primitive in parts.primitives]
    low = np.min([p.centre - p.half_extents() for p in primitives], axis=0)
    high = np.max([p.centre + p.half_extents() for p in primitives], axis=0)
    scale = BOUNDING_BOX_DIAGONAL / np.linalg.norm(high - low)
    shift = -(low + high) / 2 * scale
    return SyntheticShape(category, [primitive.scaled(scale, shift) for primitive in primitives])
