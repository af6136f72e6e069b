"""SODA's models. Both, with the ray helpers they need, live in one module, :mod:`.modeling_soda`
(why: its docstring)."""

import sys

from soda_diffusers.models import modeling_soda
from soda_diffusers.models.modeling_soda import SODAEncoder, SODAUNet2DModel

# Pipelines saved before the models shared one module name their former modules in model_index.json, and
# DiffusionPipeline.from_pretrained takes such a module from sys.modules: both names are modeling_soda.
for _former in ("soda_encoder", "soda_unet_2d"):
    sys.modules[f"{__name__}.{_former}"] = modeling_soda

__all__ = ["SODAEncoder", "SODAUNet2DModel"]
