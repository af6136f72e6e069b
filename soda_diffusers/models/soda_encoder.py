"""The SODA encoder: source view(s) -> bottleneck latent ``z``."""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from soda_diffusers.cameras import orbit_rays
from soda_diffusers.ray_encoding import RayEncoding


class SODAEncoder(ModelMixin, ConfigMixin):
    r"""ResNet encoder of one or more source views into the latent ``z`` that conditions the U-Net.

    The stem is a stride-1 3x3 convolution: at 32 or 64 px an ImageNet stem (7x7 stride 2 plus max
    pool) would discard three quarters of the pixels before the first residual block. Resolution
    then halves at the start of every stage after the first. With several source views, each view
    is encoded on its own (its rays expressed in the first source's frame) and the latents are
    averaged, so the encoder accepts any number of views.

    Parameters:
        in_channels: image channels.
        sample_size: the resolution source images are resized to.
        block_out_channels: width of each stage.
        layers_per_block: residual blocks per stage.
        latent_dim: size of ``z``, the bottleneck.
        norm_num_groups: groups of the GroupNorms.
        use_source_rays: concatenate the source views' ray encoding to the image.
        ray_encoding, ray_sinusoidal_bands, ray_fourier_features, ray_fourier_scale: see
            :class:`~soda_diffusers.ray_encoding.RayEncoding`.
        fov_deg: field of view of the canonical rays used when no ``source_rays`` are given.
        pooling: how the last feature map becomes ``z``: ``"mean"`` (global average, as a ResNet
            classifier) or ``"flatten"`` (every position keeps its own weights: on a small object in a
            large white frame the mean washes out where the object is and what its outline is).
        latent_norm: ``"batch"`` standardises each latent dimension over the batch (running statistics
            in eval mode), ``"none"`` leaves ``z`` as it is. A freshly initialised encoder gives nearly
            the same ``z`` for every object (their differences are a few percent of a large shared
            part, which normalising each latent on its own keeps), so the U-Net first learns to ignore
            ``z`` and the encoder gets little signal; batch standardisation keeps only the differences
            between objects, at unit scale, from the first step.
        background_value: subtracted from the source pixels before the stem and the thumbnail, so that
            the background is zero (1.0 for NMR's white): only the object's pixels carry signal in.
        thumbnail_size: when above 0, the source view average-pooled to ``thumbnail_size`` squared
            pixels also feeds ``z``, through one linear map beside the ResNet. Trained alone, the
            ResNet stays nearly colour-blind (its stem's weights grow equal on R, G and B), and the
            U-Net then draws each category's usual colours; on this path an object's colours reach
            ``z`` without passing a normalisation.
        patch_size: the encoder works on ``patch_size x patch_size`` pixel patches folded into channels
            (pixel unshuffle, as :class:`SODAUNet2DModel`'s option): ``patch_size**2`` times fewer
            positions for its full-resolution stage, its costliest.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        sample_size: int = 32,
        block_out_channels: tuple[int, ...] = (64, 128, 256, 512),
        layers_per_block: int = 2,
        latent_dim: int = 256,
        norm_num_groups: int = 32,
        use_source_rays: bool = True,
        ray_encoding: str = "plucker",
        ray_sinusoidal_bands: int = 4,
        ray_fourier_features: int = 16,
        ray_fourier_scale: float = 1.0,
        fov_deg: float = 30.0,
        pooling: str = "mean",
        latent_norm: str = "none",
        patch_size: int = 1,
        background_value: float = 0.0,
        thumbnail_size: int = 0,
    ):
        super().__init__()
        if sample_size % (patch_size * 2 ** (len(block_out_channels) - 1)):
            raise ValueError(
                f"sample_size: {sample_size} cannot be split in {patch_size}-pixel patches and halved "
                f"{len(block_out_channels) - 1} times (block_out_channels)"
            )
        ray_channels = 0
        if use_source_rays:
            self.ray_embedding = RayEncoding(
                ray_encoding, ray_sinusoidal_bands, ray_fourier_features, ray_fourier_scale
            )
            ray_channels = self.ray_embedding.out_channels
            # A single source view seen from its own camera: origin 0, directions set by the lens.
            canonical = orbit_rays([0.0], fov_deg=fov_deg, size=sample_size)
            self.register_buffer("canonical_rays", canonical, persistent=False)

        self.conv_in = nn.Conv2d((in_channels + ray_channels) * patch_size**2, block_out_channels[0], 3, padding=1)
        stages = []
        channels = block_out_channels[0]
        for i, out_channels in enumerate(block_out_channels):
            layers = [] if i == 0 else [Downsample2D(channels, use_conv=True, out_channels=channels, padding=1, name="op")]
            for _ in range(layers_per_block):
                layers.append(
                    ResnetBlock2D(
                        in_channels=channels, out_channels=out_channels, temb_channels=None, groups=norm_num_groups
                    )
                )
                channels = out_channels
            stages.append(_Stage(layers))
        self.stages = nn.ModuleList(stages)
        self.norm_out = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        if pooling not in ("mean", "flatten"):
            raise ValueError(f"pooling: expected 'mean' or 'flatten', got {pooling!r}")
        final_size = sample_size // patch_size // 2 ** (len(block_out_channels) - 1)
        self.proj_out = nn.Linear(channels * (final_size**2 if pooling == "flatten" else 1), latent_dim)
        if thumbnail_size:
            self.thumbnail_proj = nn.Linear(in_channels * thumbnail_size**2, latent_dim)
        if latent_norm not in ("none", "batch"):
            raise ValueError(f"latent_norm: expected 'none' or 'batch', got {latent_norm!r}")
        if latent_norm == "batch":
            self.latent_batch_norm = nn.BatchNorm1d(latent_dim, affine=False)

    def forward(self, source_image: torch.Tensor, source_rays: torch.Tensor | None = None) -> torch.Tensor:
        """``source_image`` ``(B, 3, H, W)`` or ``(B, k, 3, H, W)`` in [-1, 1], ``source_rays`` of the same
        layout with 6 channels (optional for one view) -> ``z`` ``(B, latent_dim)``."""
        config = self.config
        if source_image.ndim == 4:
            source_image = source_image[:, None]
            source_rays = None if source_rays is None else source_rays[:, None]
        if source_image.ndim != 5 or source_image.shape[2] != config.in_channels:
            raise ValueError(
                f"source_image: expected (B, {config.in_channels}, H, W) or (B, k, {config.in_channels}, H, W), "
                f"got {tuple(source_image.shape)}"
            )
        batch, views = source_image.shape[:2]
        size = source_image.shape[-2:]
        if tuple(size) != (config.sample_size, config.sample_size):
            raise ValueError(
                f"source_image: expected {config.sample_size}x{config.sample_size} pixels, got {size[0]}x{size[1]}"
            )
        pixels = source_image.flatten(0, 1) - config.background_value
        x = pixels
        if config.use_source_rays:
            if source_rays is None:
                if views > 1:
                    raise ValueError(
                        f"source_rays: required with {views} source views (their cameras relative to the first)"
                    )
                source_rays = self.canonical_rays.to(x.dtype).expand(batch, 1, -1, -1, -1)
            if source_rays.shape != (batch, views, 6, *size):
                raise ValueError(
                    f"source_rays: expected shape {(batch, views, 6, *size)}, got {tuple(source_rays.shape)}"
                )
            x = torch.cat([x, self.ray_embedding(source_rays.flatten(0, 1).to(x.dtype))], dim=1)

        h = self.conv_in(nn.functional.pixel_unshuffle(x, config.patch_size))
        for stage in self.stages:
            h = stage(h)
        h = nn.functional.silu(self.norm_out(h))
        z = self.proj_out(h.flatten(1) if config.pooling == "flatten" else h.mean(dim=(2, 3)))
        if config.thumbnail_size:
            z = z + self.thumbnail_proj(nn.functional.adaptive_avg_pool2d(pixels, config.thumbnail_size).flatten(1))
        if config.latent_norm == "batch":
            z = self.latent_batch_norm(z)
        return z.view(batch, views, -1).mean(dim=1)


class _Stage(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.gradient_checkpointing = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if isinstance(layer, ResnetBlock2D):
                if torch.is_grad_enabled() and self.gradient_checkpointing:
                    h = self._gradient_checkpointing_func(layer, h, None)
                else:
                    h = layer(h, None)
            else:
                h = layer(h)
        return h
