"""Shared fixtures: tiny models that run in milliseconds on two CPU cores."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from diffusers import ConfigMixin, DDIMScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from soda_diffusers import SODAEncoder, SODANovelViewPipeline, SODAUNet2DModel, scheduler_config

torch.set_num_threads(min(2, os.cpu_count() or 1))
# View stores and the synthetic data that tests build without naming a folder go to a fresh cache, not
# the user's (training subprocesses inherit it).
os.environ.setdefault("SODA_DIFFUSERS_CACHE", tempfile.mkdtemp(prefix="soda-diffusers-test-cache-"))

# Run first in the fresh processes that must not see soda_diffusers: the package is installed
# (editable), so it has to be refused actively.
BLOCK_PACKAGE = """
import sys

class RefuseSodaDiffusers:
    def find_spec(self, name, path=None, target=None):
        if name == "soda_diffusers" or name.startswith("soda_diffusers."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)

sys.meta_path.insert(0, RefuseSodaDiffusers())
try:
    import soda_diffusers
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("soda_diffusers is importable in a process that must run without it")
"""

TINY_SIZE = 16
TINY_ENCODER = dict(
    sample_size=TINY_SIZE, block_out_channels=(8, 16), layers_per_block=1, latent_dim=12, norm_num_groups=4,
    ray_fourier_features=4,
)
TINY_UNET = dict(
    sample_size=TINY_SIZE, block_out_channels=(8, 16), layers_per_block=1, latent_dim=12, norm_num_groups=4,
    attention_resolutions=(8,), attention_head_dim=8, layerwise_modulation=True, ray_fourier_features=4,
)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace zero-initialised layers by small random weights, so every path carries signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def make_tiny_pipeline(
    prediction_type: str = "epsilon", schedule: str = "inverted_cosine", **encoder_overrides
) -> SODANovelViewPipeline:
    torch.manual_seed(0)
    encoder = randomize_(SODAEncoder(**{**TINY_ENCODER, **encoder_overrides}), 1).eval()
    if encoder.config.latent_norm == "batch":  # statistics that matter, as after training
        encoder.latent_batch_norm.running_mean.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
        encoder.latent_batch_norm.running_var.uniform_(0.01, 0.1, generator=torch.Generator().manual_seed(5))
    unet = randomize_(SODAUNet2DModel(**TINY_UNET), 2).eval()
    scheduler = DDIMScheduler.from_config(scheduler_config(schedule, prediction_type))
    pipe = SODANovelViewPipeline(encoder=encoder, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float32)


@pytest.fixture
def tiny_pipeline() -> SODANovelViewPipeline:
    return make_tiny_pipeline()


class OracleUNet(ModelMixin, ConfigMixin):
    """A denoiser that knows the clean image: returns the exact noise (or velocity) for it.

    It reads the noise level of a (possibly fractional) timestep off the scheduler's
    ``alphas_cumprod`` the way Euler-type schedulers interpolate it, in sigma space."""

    @register_to_config
    def __init__(self, sample_size: int = TINY_SIZE, in_channels: int = 3, latent_dim: int = 12,
                 prediction_type: str = "epsilon"):
        super().__init__()
        self.register_buffer("clean", torch.zeros(1, in_channels, sample_size, sample_size))
        self.register_buffer("alphas_cumprod", torch.ones(1000))

    def forward(self, sample, timestep, target_rays, z, return_dict=True):
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)[0].item()
        low, frac = int(t), t - int(t)
        high = min(low + 1, len(sigmas) - 1)
        sigma = sigmas[low] * (1 - frac) + sigmas[high] * frac
        alpha_bar = 1 / (1 + sigma**2)
        eps = (sample - alpha_bar.sqrt() * self.clean) / (1 - alpha_bar).sqrt()
        if self.config.prediction_type == "v_prediction":
            eps = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * self.clean
        return UNet2DOutput(sample=eps.to(sample.dtype))


def oracle_pipeline(scheduler, clean: torch.Tensor) -> SODANovelViewPipeline:
    unet = OracleUNet(prediction_type=scheduler.config.prediction_type)
    unet.clean.copy_(clean)
    unet.alphas_cumprod.copy_(torch.as_tensor(scheduler.alphas_cumprod))
    pipe = SODANovelViewPipeline(encoder=SODAEncoder(**TINY_ENCODER), unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [0, 1]."""
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


class TinyFeatures(nn.Module):
    """A random two-stage conv net standing in for VGG16 in LPIPS."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())

    def forward(self, x):
        h1 = self.stage1(x)
        return [h1, self.stage2(h1)]
