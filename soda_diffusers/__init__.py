"""SODA bottleneck diffusion models for novel view synthesis, as Hugging Face Diffusers components."""

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
