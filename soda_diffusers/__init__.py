"""SODA bottleneck diffusion models for novel view synthesis, as Hugging Face Diffusers components."""

import os

# PyTorch's OpenMP threads spin while they wait for each other; when another process shares the cores, a
# spinning thread holds a core its partner needs, and a CPU training step gets several times slower
# (docs/results.md, "Sharing the cores"). Waiting passively costs little on an idle machine. It must be
# set before torch is first imported; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# DiffusionPipeline.from_pretrained looks the loading base classes up in the module named in
# model_index.json ("soda_diffusers"): without these names here it cannot load our components.
from diffusers import ConfigMixin, ModelMixin, SchedulerMixin  # noqa: F401

from soda_diffusers.cameras import nmr_cameras, nmr_rays, orbit_rays
from soda_diffusers.models import SODAEncoder, SODAUNet2DModel
from soda_diffusers.pipeline_soda_novel_view import SODANovelViewPipeline
from soda_diffusers.schedules import scheduler_config

__version__ = "0.1.0"

__all__ = [
    "SODAEncoder",
    "SODANovelViewPipeline",
    "SODAUNet2DModel",
    "nmr_cameras",
    "nmr_rays",
    "orbit_rays",
    "scheduler_config",
]
