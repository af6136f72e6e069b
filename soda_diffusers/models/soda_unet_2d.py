"""The SODA denoiser: a UNet2DModel variant whose every ResNet block is modulated by ``z`` (AdaGN)."""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.upsampling import Upsample2D
from torch import nn

from soda_diffusers.ray_encoding import RayEncoding


class AdaGNResnetBlock(nn.Module):
    r"""ResNet block with SODA's AdaGN: ``h = z_s * (t_s * GroupNorm(h) + t_b) + z_b``.

    ``t_s, t_b`` come from the timestep embedding and ``z_s, z_b`` from a linear map of the latent
    (its chunk, with layer-wise modulation); the second GroupNorm has no affine parameters of its
    own. Scales are parametrised as ``1 + linear(.)`` so a zero latent leaves features unscaled.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, z_channels: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(temb_channels, 2 * out_channels)
        self.z_proj = nn.Linear(z_channels, 2 * out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Zero-initialised last convolution: each block starts as the identity, which trains faster.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        t_s, t_b = self.time_proj(temb)[:, :, None, None].chunk(2, dim=1)
        z_s, z_b = self.z_proj(z)[:, :, None, None].chunk(2, dim=1)
        h = (1 + z_s) * ((1 + t_s) * self.norm2(h) + t_b) + z_b
        h = self.conv2(self.dropout(nn.functional.silu(h)))
        return self.shortcut(x) + h


class SODAUNet2DModel(ModelMixin, ConfigMixin):
    r"""U-Net denoiser of SODA: sees the noisy target, the target's ray encoding (extra input
    channels) and the latent ``z`` (AdaGN in every ResNet block), nothing else.

    Levels: ``len(block_out_channels)`` down levels, a middle, and as many up levels. With
    ``layerwise_modulation`` the latent is split into ``levels + 1`` chunks: chunk ``i`` modulates
    down level ``i`` and its mirror up level, the last chunk the middle. With
    ``cross_attention_resolutions``, blocks at those resolutions also attend to ``z`` split into
    ``latent_tokens`` tokens (SODA's 3D setting uses cross-attention beside AdaGN): each position
    reads what it needs of the latent, where AdaGN gives every position the same scale and shift.
    ``layer_mask_prob`` drops (zeroes) each chunk independently in training and ``z_drop_prob`` the whole latent (for
    classifier-free guidance); both act only in ``train()`` mode, so evaluation is deterministic.

    Parameters:
        sample_size: image resolution.
        in_channels, out_channels: image channels.
        block_out_channels: width of each level.
        layers_per_block: ResNet blocks per down level (up levels have one more).
        attention_resolutions: resolutions (in positions, after patching) that get a self-attention layer after each block.
        attention_head_dim: channels per attention head.
        norm_num_groups: groups of the GroupNorms.
        dropout: dropout inside the ResNet blocks.
        latent_dim: size of ``z``.
        layerwise_modulation, layer_mask_prob, z_drop_prob: see above.
        ray_encoding, ray_sinusoidal_bands, ray_fourier_features, ray_fourier_scale: see
            :class:`~soda_diffusers.ray_encoding.RayEncoding`.
        patch_size: the U-Net works on ``patch_size x patch_size`` pixel patches folded into channels
            (pixel unshuffle), ``patch_size**2`` times fewer positions: the cheapest way to spend a CPU's
            few FLOPs on depth and width rather than on full-resolution convolutions.
        cross_attention_resolutions: resolutions (in positions, after patching) whose blocks get a
            cross-attention layer to the latent tokens; empty: AdaGN only.
        latent_tokens: how many tokens ``z`` is split into for cross-attention (``latent_dim`` must be a
            multiple); each is embedded by one shared linear map plus a learnt embedding of its index.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: tuple[int, ...] = (64, 128, 128, 256),
        layers_per_block: int = 2,
        attention_resolutions: tuple[int, ...] = (),
        attention_head_dim: int = 32,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        latent_dim: int = 256,
        layerwise_modulation: bool = False,
        layer_mask_prob: float = 0.0,
        z_drop_prob: float = 0.1,
        ray_encoding: str = "plucker",
        ray_sinusoidal_bands: int = 4,
        ray_fourier_features: int = 16,
        ray_fourier_scale: float = 1.0,
        patch_size: int = 1,
        cross_attention_resolutions: tuple[int, ...] = (),
        latent_tokens: int = 8,
    ):
        super().__init__()
        levels = len(block_out_channels)
        if cross_attention_resolutions and (latent_tokens < 1 or latent_dim % latent_tokens):
            raise ValueError(f"latent_tokens: expected a divisor of latent_dim ({latent_dim}), got {latent_tokens}")
        if sample_size % (patch_size * 2 ** (levels - 1)):
            raise ValueError(
                f"sample_size: {sample_size} cannot be split in {patch_size}-pixel patches and halved "
                f"{levels - 1} times (block_out_channels)"
            )
        self.z_chunk_sizes = [len(c) for c in torch.arange(latent_dim).tensor_split(levels + 1)]
        if layerwise_modulation and min(self.z_chunk_sizes) == 0:
            raise ValueError(f"latent_dim: {latent_dim} is too small to split into {levels + 1} chunks")

        def z_channels(level: int) -> int:
            return self.z_chunk_sizes[level] if layerwise_modulation else latent_dim

        self.ray_embedding = RayEncoding(ray_encoding, ray_sinusoidal_bands, ray_fourier_features, ray_fourier_scale)
        temb_channels = 4 * block_out_channels[0]
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], temb_channels)
        input_channels = (in_channels + self.ray_embedding.out_channels) * patch_size**2
        self.conv_in = nn.Conv2d(input_channels, block_out_channels[0], 3, padding=1)

        def resnet(cin: int, cout: int, level: int) -> AdaGNResnetBlock:
            return AdaGNResnetBlock(cin, cout, temb_channels, z_channels(level), norm_num_groups, dropout)

        def attention(channels: int, **cross) -> Attention:
            return Attention(
                channels,
                heads=max(1, channels // attention_head_dim),
                dim_head=attention_head_dim,
                norm_num_groups=norm_num_groups,
                residual_connection=True,
                bias=True,
                upcast_softmax=True,
                **(cross or {"_from_deprecated_attn_block": True}),
            )

        def cross_attention(channels: int) -> Attention:
            layer = attention(channels, cross_attention_dim=temb_channels)
            # Zero-initialised output: the layer starts as the identity, as the ResNet blocks do.
            nn.init.zeros_(layer.to_out[0].weight)
            nn.init.zeros_(layer.to_out[0].bias)
            return layer

        def block(cin: int, cout: int, level: int, resolution: int) -> _Block:
            return _Block(
                resnet(cin, cout, level),
                attention(cout) if resolution in attention_resolutions else None,
                cross_attention(cout) if resolution in cross_attention_resolutions else None,
            )

        if cross_attention_resolutions:
            self.latent_token_proj = nn.Linear(latent_dim // latent_tokens, temb_channels)
            self.latent_token_embedding = nn.Parameter(torch.zeros(latent_tokens, temb_channels))

        self.down_levels = nn.ModuleList()
        skip_channels = [block_out_channels[0]]
        channels, resolution = block_out_channels[0], sample_size // patch_size
        for level, width in enumerate(block_out_channels):
            blocks = []
            for _ in range(layers_per_block):
                blocks.append(block(channels, width, level, resolution))
                channels = width
                skip_channels.append(channels)
            down = None
            if level < levels - 1:
                down = Downsample2D(channels, use_conv=True, out_channels=channels, padding=1, name="op")
                skip_channels.append(channels)
                resolution //= 2
            self.down_levels.append(_Level("down", level, blocks, down))

        # As in ADM, the middle has attention whenever any resolution has.
        mid_attention = attention(channels) if attention_resolutions else None
        mid_cross_attention = cross_attention(channels) if resolution in cross_attention_resolutions else None
        mid_blocks = [
            _Block(resnet(channels, channels, levels), mid_attention, mid_cross_attention),
            _Block(resnet(channels, channels, levels), None),
        ]
        self.mid_level = _Level("mid", levels, mid_blocks, None)

        self.up_levels = nn.ModuleList()
        for level in reversed(range(levels)):
            width = block_out_channels[level]
            blocks = []
            for _ in range(layers_per_block + 1):
                blocks.append(block(channels + skip_channels.pop(), width, level, resolution))
                channels = width
            up = None
            if level > 0:
                up = Upsample2D(channels, use_conv=True, out_channels=channels)
                resolution *= 2
            self.up_levels.append(_Level("up", level, blocks, up))

        self.conv_norm_out = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.conv_out = nn.Conv2d(channels, out_channels * patch_size**2, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def z_chunks(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The latent each level sees: chunk ``i`` per level with layer-wise modulation, else all of ``z``."""
        if not self.config.layerwise_modulation:
            return [z] * (len(self.config.block_out_channels) + 1)
        return list(z.split(self.z_chunk_sizes, dim=1))

    def latent_tokens(self, z: torch.Tensor) -> torch.Tensor | None:
        """``z`` as ``(B, latent_tokens, C)`` tokens for cross-attention; None without cross-attention."""
        if not self.config.cross_attention_resolutions:
            return None
        tokens = z.view(z.shape[0], self.config.latent_tokens, -1)
        return self.latent_token_proj(tokens) + self.latent_token_embedding

    def drop_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Training-time z-dropout (whole latent, for classifier-free guidance) and layer masking (chunks)."""
        keep = torch.ones_like(z)
        if self.config.layer_mask_prob > 0 and self.config.layerwise_modulation:
            chunk_keep = (torch.rand(z.shape[0], len(self.z_chunk_sizes), device=z.device) >= self.config.layer_mask_prob)
            keep = keep * chunk_keep.to(z.dtype).repeat_interleave(torch.tensor(self.z_chunk_sizes, device=z.device), dim=1)
        if self.config.z_drop_prob > 0:
            keep = keep * (torch.rand(z.shape[0], 1, device=z.device) >= self.config.z_drop_prob).to(z.dtype)
        return z * keep

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        target_rays: torch.Tensor,
        z: torch.Tensor,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        """Predict the scheduler's target (noise, velocity or clean image) for ``sample``.

        Args:
            sample: noisy target views ``(B, in_channels, H, W)``.
            timestep: integer or float timesteps, a scalar or one per sample.
            target_rays: raw rays ``(B, 6, H, W)`` of the target views, in the source camera's frame.
            z: latents ``(B, latent_dim)`` from :class:`SODAEncoder` (zeros: unconditional).
        """
        config = self.config
        batch = sample.shape[0]
        expected = (config.in_channels, config.sample_size, config.sample_size)
        if sample.ndim != 4 or tuple(sample.shape[1:]) != expected:
            raise ValueError(f"sample: expected (B, {', '.join(map(str, expected))}), got {tuple(sample.shape)}")
        if target_rays.shape != (batch, 6, *sample.shape[2:]):
            raise ValueError(f"target_rays: expected {(batch, 6, *sample.shape[2:])}, got {tuple(target_rays.shape)}")
        if z.shape != (batch, config.latent_dim):
            raise ValueError(f"z: expected {(batch, config.latent_dim)}, got {tuple(z.shape)}")

        timesteps = torch.as_tensor(timestep, device=sample.device)
        timesteps = timesteps.reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps.reshape(batch)
        temb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))
        temb = nn.functional.silu(temb)
        z = z.to(sample.dtype)
        if self.training:
            z = self.drop_latents(z)
        z_per_level = self.z_chunks(z)
        tokens = self.latent_tokens(z)

        h = torch.cat([sample, self.ray_embedding(target_rays.to(sample.dtype))], dim=1)
        h = self.conv_in(nn.functional.pixel_unshuffle(h, config.patch_size))
        skips = [h]
        for level in self.down_levels:
            h = level(h, temb, z_per_level[level.level], tokens, skips)
        h = self.mid_level(h, temb, z_per_level[-1], tokens, skips)
        for level in self.up_levels:
            h = level(h, temb, z_per_level[level.level], tokens, skips)
        h = self.conv_out(nn.functional.silu(self.conv_norm_out(h)))
        h = nn.functional.pixel_shuffle(h, config.patch_size)
        if not return_dict:
            return (h,)
        return UNet2DOutput(sample=h)


class _Block(nn.Module):
    def __init__(self, resnet: AdaGNResnetBlock, attention: nn.Module | None, cross_attention: nn.Module | None = None):
        super().__init__()
        self.resnet = resnet
        self.attention = attention
        self.cross_attention = cross_attention

    def forward(self, h: torch.Tensor, temb: torch.Tensor, z: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
        h = self.resnet(h, temb, z)
        if self.attention is not None:
            h = self.attention(h)
        if self.cross_attention is not None:
            h = self.cross_attention(h, encoder_hidden_states=tokens)
        return h


class _Level(nn.Module):
    """The blocks of one resolution, then its down- or upsampling. Down levels push every output
    to ``skips`` and up levels pop one skip connection per block."""

    def __init__(self, kind: str, level: int, blocks: list[_Block], resample: nn.Module | None):
        super().__init__()
        self.kind = kind
        self.level = level
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample
        self.gradient_checkpointing = False

    def forward(self, h: torch.Tensor, temb: torch.Tensor, z: torch.Tensor, tokens: torch.Tensor | None,
                skips: list) -> torch.Tensor:
        for block in self.blocks:
            if self.kind == "up":
                h = torch.cat([h, skips.pop()], dim=1)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                h = self._gradient_checkpointing_func(block, h, temb, z, tokens)
            else:
                h = block(h, temb, z, tokens)
            if self.kind == "down":
                skips.append(h)
        if self.resample is not None:
            h = self.resample(h)
            if self.kind == "down":
                skips.append(h)
        return h
