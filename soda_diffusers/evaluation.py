"""Novel view synthesis of whole objects: every other view from one source view, and its scores.

The protocol of pixelNeRF on NMR: one source view per object, the 23 other views as targets
(never the source itself), PSNR and SSIM on [0, 1] images, averaged per object, then over objects.
"""

from __future__ import annotations

import torch

from soda_diffusers.cameras import NMR_NUM_VIEWS, nmr_rays
from soda_diffusers.metrics import psnr, ssim


def target_views(source_view: int, num_views: int = NMR_NUM_VIEWS) -> list[int]:
    return [view for view in range(num_views) if view != source_view]


def object_target_rays(obj: dict, source_view: int, size: int) -> torch.Tensor:
    return nmr_rays(obj["cameras"], source_view, target_views(source_view, obj["images"].shape[0]), size)


@torch.no_grad()
def generate_views(
    pipe,
    source_images: torch.Tensor,
    target_rays: torch.Tensor,
    seed: int = 0,
    **pipe_kwargs,
) -> torch.Tensor:
    """Generated views ``(N, 3, H, W)`` in [-1, 1], one per target ray map, in one batched call.

    ``source_images`` holds one source ``(3, H, W)`` for all targets or one per target
    ``(N, 3, H, W)``; each target gets its own generator (``seed + i``), so a target's image does
    not depend on what else is in the batch."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(target_rays.shape[0])]
    images = pipe(source_images, target_rays, generator=generators, output_type="pt", **pipe_kwargs).images
    return images.cpu() * 2 - 1


def view_scores(generated: torch.Tensor, targets: torch.Tensor) -> dict[str, list[float]]:
    """Per-view PSNR and SSIM of images in [-1, 1]."""
    generated, targets = (generated.float().clamp(-1, 1) + 1) / 2, (targets.float().clamp(-1, 1) + 1) / 2
    return {"psnr": psnr(generated, targets).tolist(), "ssim": ssim(generated, targets).tolist()}
