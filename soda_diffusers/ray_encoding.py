"""Per-pixel encodings of 6-D rays ``[origin, direction]`` for the networks' extra input channels.

* ``sinusoidal``: NeRF's positional encoding of origin and direction, ``6 * (1 + 2 * bands)``
  channels, frequencies ``2^0 .. 2^(bands-1)``. Few bands on purpose: a high band on the 24
  discrete NMR camera origins acts as a view-id code rather than geometry.
* ``plucker``: Pluecker coordinates ``[d, o x d]`` (6 channels) followed by Gaussian Fourier
  features ``sin/cos(2 pi B p)`` of them (``2 * fourier_features`` channels). Pluecker coordinates
  identify the ray itself (they do not change when the origin slides along it) and are smooth in
  the camera pose; the random features are the "rays projected on a sphere, 512-d" idea of the
  SODA paper made concrete.

Origins are divided by ``origin_scale`` (the NMR camera distance) so both encodings see
coordinates of order one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

RAY_ENCODINGS = ("sinusoidal", "plucker")


def ray_encoding_channels(kind: str, sinusoidal_bands: int, fourier_features: int) -> int:
    if kind == "sinusoidal":
        return 6 * (1 + 2 * sinusoidal_bands)
    if kind == "plucker":
        return 6 + 2 * fourier_features
    raise ValueError(f"ray_encoding: expected one of {RAY_ENCODINGS}, got {kind!r}")


def sinusoidal_ray_encoding(rays: torch.Tensor, bands: int, origin_scale: float = 1.0) -> torch.Tensor:
    """NeRF positional encoding of ``rays`` ``(N, 6, H, W)`` -> ``(N, 6 * (1 + 2 * bands), H, W)``."""
    x = torch.cat([rays[:, :3] / origin_scale, rays[:, 3:]], dim=1)
    if bands == 0:
        return x
    freqs = 2.0 ** torch.arange(bands, device=rays.device, dtype=rays.dtype)
    angles = (x[:, None] * freqs[None, :, None, None, None]).flatten(1, 2)
    return torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=1)


def plucker_coordinates(rays: torch.Tensor, origin_scale: float = 1.0) -> torch.Tensor:
    """``[d, o x d]`` of ``rays`` ``(N, 6, H, W)`` -> ``(N, 6, H, W)``."""
    origins, directions = rays[:, :3] / origin_scale, rays[:, 3:]
    return torch.cat([directions, torch.cross(origins, directions, dim=1)], dim=1)


class RayEncoding(nn.Module):
    """Encodes raw rays ``(N, 6, H, W)`` into ``out_channels`` feature maps (see module docstring)."""

    def __init__(
        self,
        kind: str = "plucker",
        sinusoidal_bands: int = 4,
        fourier_features: int = 16,
        fourier_scale: float = 1.0,
        origin_scale: float = 2.732,
        seed: int = 0,
    ):
        super().__init__()
        self.kind = kind
        self.sinusoidal_bands = sinusoidal_bands
        self.origin_scale = origin_scale
        self.out_channels = ray_encoding_channels(kind, sinusoidal_bands, fourier_features)
        generator = torch.Generator().manual_seed(seed)
        # Saved with the weights so a reloaded model sees exactly the same features.
        self.register_buffer("fourier_matrix", torch.randn(fourier_features, 6, generator=generator) * fourier_scale)

    def forward(self, rays: torch.Tensor) -> torch.Tensor:
        if self.kind == "sinusoidal":
            return sinusoidal_ray_encoding(rays, self.sinusoidal_bands, self.origin_scale)
        plucker = plucker_coordinates(rays, self.origin_scale)
        if self.fourier_matrix.shape[0] == 0:
            return plucker
        projected = 2 * math.pi * torch.einsum("fc,nchw->nfhw", self.fourier_matrix.to(rays.dtype), plucker)
        return torch.cat([plucker, torch.sin(projected), torch.cos(projected)], dim=1)
