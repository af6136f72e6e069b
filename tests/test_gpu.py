"""GPU paths: run when CUDA is present, skipped (with the reason shown by ``-ra``) otherwise."""

import pytest
import torch
from conftest import make_tiny_pipeline

from soda_diffusers import orbit_rays

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none found")


@requires_cuda
@pytest.mark.gpu
def test_pipeline_on_gpu_in_half_precision_matches_fp32():
    pipe = make_tiny_pipeline()
    rays = orbit_rays([15.0, 30.0], size=16)
    source = torch.zeros(3, 16, 16)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    reference = pipe(source, rays, num_inference_steps=5, latents=noise, output_type="pt").images
    pipe = pipe.to("cuda", torch.float16)
    images = pipe(source, rays, num_inference_steps=5, latents=noise, output_type="pt").images
    assert images.device.type == "cpu" or images.is_cuda
    assert (images.float().cpu() - reference).abs().mean() < 0.02
