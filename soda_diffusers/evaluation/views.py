"""Novel view synthesis of whole objects: every other view from one source view, and its scores.

The protocol of pixelNeRF on NMR: one source view per object, the 23 other views as targets
(never the source itself), PSNR and SSIM on [0, 1] images, averaged per object, then over objects;
beside them the foreground IoU and colour error of :func:`view_scores`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from soda_diffusers.cameras import NMR_NUM_VIEWS, nmr_rays
from soda_diffusers.metrics import (
    foreground_color_error,
    foreground_color_error_parts,
    foreground_iou,
    light_grey_percent,
    psnr,
    ssim,
    ssim_pixelnerf,
)


def target_views(source_view: int, num_views: int = NMR_NUM_VIEWS) -> list[int]:
    return [view for view in range(num_views) if view != source_view]


def object_target_rays(obj: dict, source_view: int, size: int) -> torch.Tensor:
    return nmr_rays(obj["cameras"], source_view, target_views(source_view, obj["images"].shape[0]), size)


# What :func:`view_scores` returns, in this order (see :mod:`soda_diffusers.metrics` for each definition).
VIEW_METRICS = ("psnr", "ssim", "ssim_pixelnerf", "fg_iou", "fg_color_error", "fg_brightness_error", "fg_chroma_error",
                "light_grey", "target_light_grey")


def view_scores(generated: torch.Tensor, targets: torch.Tensor) -> dict[str, list[float]]:
    """Per-view scores of generated views against their targets, ``(N, 3, H, W)`` images in [-1, 1]:
    one list of N values for each of :data:`VIEW_METRICS`.

    ``psnr``, ``ssim`` (Gaussian window) and ``ssim_pixelnerf`` (pixelNeRF's uniform window) on the
    images mapped to [0, 1]; ``fg_iou``, the IoU of the object silhouettes on the white background, and
    ``fg_color_error``, the distance in 0-255 RGB between the mean object colours: what a person sees
    first (is the shape there, is it the right colour), which PSNR and SSIM can rate below a grey blur;
    and that colour error's ``fg_brightness_error`` and ``fg_chroma_error`` parts (too light or dark, or
    the wrong hue); ``light_grey`` and ``target_light_grey``, the percent of light grey pixels in the
    generated view and in its target, whose ratio (:func:`light_grey_ratio`) measures the pale rim."""
    generated, targets = (generated.float().clamp(-1, 1) + 1) / 2, (targets.float().clamp(-1, 1) + 1) / 2
    brightness, chroma = foreground_color_error_parts(generated, targets)
    return {
        "psnr": psnr(generated, targets).tolist(),
        "ssim": ssim(generated, targets).tolist(),
        "ssim_pixelnerf": ssim_pixelnerf(generated, targets).tolist(),
        "fg_iou": foreground_iou(generated, targets).tolist(),
        "fg_color_error": foreground_color_error(generated, targets).tolist(),
        "fg_brightness_error": brightness.tolist(),
        "fg_chroma_error": chroma.tolist(),
        "light_grey": light_grey_percent(generated).tolist(),
        "target_light_grey": light_grey_percent(targets).tolist(),
    }


def light_grey_ratio(scores: dict) -> float | None:
    """Light grey pixels in the generated views over those in their targets, from averaged scores (1: as
    many as the targets have; the samples' pale rim raises it). None when the targets have none."""
    if not scores.get("target_light_grey"):
        return None
    return scores["light_grey"] / scores["target_light_grey"]


def _seed_from(*parts) -> int:
    # A hash rather than Python's hash(): the same on every run and machine. 60 bits fit manual_seed.
    return int(hashlib.sha256("/".join(str(part) for part in parts).encode()).hexdigest()[:15], 16)


def seeded_view(seed: int, object_id: str, num_views: int = NMR_NUM_VIEWS) -> int:
    """A view of object ``object_id`` drawn by ``seed`` alone: the source view when no view list fixes
    one, and the view the probes encode. It does not depend on which other objects are evaluated."""
    return _seed_from(seed, object_id, "view") % num_views


def view_seeds(seed: int, object_id: str, views: Sequence[int]) -> list[int]:
    """One generator seed per target view of an object, a function of ``(seed, object_id, view)`` only."""
    return [_seed_from(seed, object_id, int(view)) for view in views]


@torch.no_grad()
def generate_views_per_seed(
    pipe,
    source_images: torch.Tensor,
    target_rays: torch.Tensor,
    seeds: Sequence[int],
    **pipe_kwargs,
) -> torch.Tensor:
    """As :func:`generate_views`, with each target's generator seed given (``seeds[i]`` for target ``i``).

    With :func:`view_seeds` a target's starting noise depends on its object and view only, so batches
    that mix objects, and evaluations resumed part-way, draw the same noise for the same view."""
    if len(seeds) != target_rays.shape[0]:
        raise ValueError(f"seeds: expected one per target ({target_rays.shape[0]}), got {len(seeds)}")
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    images = pipe(source_images, target_rays, generator=generators, output_type="pt", **pipe_kwargs).images
    return images.cpu() * 2 - 1
