"""SODA bottleneck diffusion models for novel view synthesis, as Hugging Face Diffusers components.

The names below are imported on first use, as Diffusers' own ``__init__`` does: importing the package
loads neither torch nor diffusers, so an entry point can still set what must precede torch
(:mod:`soda_diffusers.threads`) and importing the package changes nothing in the process.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "SODAEncoder": "soda_diffusers.models",
    "SODAUNet2DModel": "soda_diffusers.models",
    "SODANovelViewPipeline": "soda_diffusers.pipeline_soda_novel_view",
    "nmr_cameras": "soda_diffusers.cameras",
    "nmr_rays": "soda_diffusers.cameras",
    "orbit_rays": "soda_diffusers.cameras",
    "scheduler_config": "soda_diffusers.schedules",
    # DiffusionPipeline.from_pretrained looks the loading base classes up in the module that
    # model_index.json names ("soda_diffusers" in pipelines saved by early versions).
    "ConfigMixin": "diffusers",
    "ModelMixin": "diffusers",
    "SchedulerMixin": "diffusers",
}

__all__ = ["SODAEncoder", "SODANovelViewPipeline", "SODAUNet2DModel", "nmr_cameras", "nmr_rays", "orbit_rays",
           "scheduler_config"]

if TYPE_CHECKING:
    from diffusers import ConfigMixin, ModelMixin, SchedulerMixin  # noqa: F401

    from soda_diffusers.cameras import nmr_cameras, nmr_rays, orbit_rays
    from soda_diffusers.models import SODAEncoder, SODAUNet2DModel
    from soda_diffusers.pipeline_soda_novel_view import SODANovelViewPipeline
    from soda_diffusers.schedules import scheduler_config


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
