from soda_diffusers.models.soda_encoder import SODAEncoder
from soda_diffusers.models.soda_unet_2d import SODAUNet2DModel

__all__ = ["SODAEncoder", "SODAUNet2DModel"]
