"""Per-pixel encodings of 6-D rays ``[origin, direction]`` for the networks' extra input channels
(:class:`RayEncoding`). They live beside the models that use them, in
:mod:`soda_diffusers.models.modeling_soda` (why: its docstring)."""

from soda_diffusers.models.modeling_soda import (
    RAY_ENCODINGS,
    RayEncoding,
    plucker_coordinates,
    ray_encoding_channels,
    sinusoidal_ray_encoding,
)

__all__ = ["RAY_ENCODINGS", "RayEncoding", "plucker_coordinates", "ray_encoding_channels", "sinusoidal_ray_encoding"]
