"""Resizing stored NMR images to a training size, the same way for every storage, the store and the stream.

Images are resized from the stored resolution (64 px for NMR) by area averaging (the mean of each
block of pixels, the same as ``F.interpolate(mode="area")`` for sizes dividing the stored one), rounded
back to uint8 so that every reader gives the very same values.
"""

from __future__ import annotations

import numpy as np


def area_downsample_uint8(images: np.ndarray, size: int, channels_last: bool = True) -> np.ndarray:
    """Resize uint8 images ``(..., S, S, C)`` (or ``(..., S, S)`` with ``channels_last=False``) to
    ``size`` by averaging square blocks of ``S / size`` pixels, rounding half up. ``size`` must divide ``S``."""
    if not channels_last:
        return area_downsample_uint8(images[..., None], size)[..., 0]
    factor = images.shape[-2] // size
    if factor == 1:
        return images
    # Adding the strided sub-grids is several times faster than a reduction over reshaped blocks.
    total = np.zeros((*images.shape[:-3], size, size, images.shape[-1]), dtype=np.uint32)
    for i in range(factor):
        for j in range(factor):
            total += images[..., i::factor, j::factor, :]
    count = factor * factor
    return ((total + count // 2) // count).astype(np.uint8)


def check_image_size(image_size: int, stored: int, where: str) -> int:
    """``image_size`` as an int, when it divides the ``stored`` size (``where`` names the data in errors)."""
    image_size = int(image_size)
    if image_size <= 0 or image_size > stored or stored % image_size:
        divisors = [s for s in range(1, stored + 1) if stored % s == 0 and s >= 4]
        raise ValueError(
            f"image_size: {where} stores {stored} px images; expected a size dividing {stored} ({divisors}), got {image_size}"
        )
    return image_size
