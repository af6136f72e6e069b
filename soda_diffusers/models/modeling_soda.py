"""SODA's models, the encoder and the U-Net, with the ray helpers they need: one modeling file for the
model family, as ``transformers`` has one per model.

Why one file: Diffusers loads a pipeline's custom component from ``<component>/<module>.py``, and from a
Hub repo ``DiffusionPipeline.download`` fetches only that one file of its code (its ``allow_patterns``):
a relative import of a sibling file would name a file that never arrives. So this module imports only
torch, diffusers and the standard library, and an exported pipeline ships it, byte for byte, as both
``encoder/modeling_soda.py`` and ``unet/modeling_soda.py`` (:mod:`soda_diffusers.hub.bundle`).

Its models are importable from :mod:`soda_diffusers.models` too, and ``camera_rays`` (the package's one ray
function) from :mod:`soda_diffusers.cameras`, which states the camera conventions.

Sections: rays (their geometry and their encodings), the encoder, the U-Net.
"""

from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.upsampling import Upsample2D
from torch import nn

# --------------------------------------------------------------------------------------------------
# Rays: per-pixel rays of a camera, and their encodings for the networks' extra input channels


def camera_rays(source_world_mats, unprojections, size: int) -> torch.Tensor:
    """Rays ``(B, 6, size, size)`` of views given by ``unprojections`` ``(B, 4, 4)``
    (``world_mat_inv @ camera_mat_inv``), each expressed in the frame that its ``source_world_mats``
    ``(B, 4, 4)`` (world -> source camera) maps to. Tensors or arrays, on any device.

    The one ray function of the package (:mod:`soda_diffusers.cameras` gives its conventions): training
    batches, evaluation, ``nmr_rays``, ``orbit_rays`` and :class:`SODAEncoder`'s canonical rays all come
    through here. It computes in float64 and returns float32, so the same cameras give the same rays
    whichever path asks."""
    source_world_mats = torch.as_tensor(source_world_mats).to(torch.float64)
    unprojections = torch.as_tensor(unprojections).to(torch.float64)
    if source_world_mats.shape[-2:] != (4, 4) or unprojections.shape[-2:] != (4, 4):
        raise ValueError(
            f"camera_rays: expected (B, 4, 4) matrices, got {tuple(source_world_mats.shape)} and "
            f"{tuple(unprojections.shape)}"
        )
    coords = torch.linspace(-1.0, 1.0, size, dtype=torch.float64, device=unprojections.device)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    grid = torch.stack([x, y, torch.ones_like(x), torch.zeros_like(x)]).reshape(4, -1)
    directions = source_world_mats[:, :3, :3] @ (unprojections @ grid)[:, :3]
    directions = directions / directions.norm(dim=1, keepdim=True)
    # The camera centre is the unprojection of the homogeneous point (0, 0, 0, 1).
    centres = source_world_mats @ unprojections[:, :, 3:]
    origins = centres[:, :3] / centres[:, 3:]
    rays = torch.cat([origins.expand_as(directions), directions], dim=1)
    return rays.reshape(-1, 6, size, size).float()


RAY_ENCODINGS = ("sinusoidal", "plucker")


def ray_encoding_channels(kind: str, sinusoidal_bands: int, fourier_features: int) -> int:
    if kind == "sinusoidal":
        return 6 * (1 + 2 * sinusoidal_bands)
    if kind == "plucker":
        return 6 + 2 * fourier_features
    raise ValueError(f"ray_encoding: expected one of {RAY_ENCODINGS}, got {kind!r}")


def sinusoidal_ray_encoding(rays: torch.Tensor, bands: int, origin_scale: float = 1.0) -> torch.Tensor:
    """NeRF positional encoding of ``rays`` ``(N, 6, H, W)`` -> ``(N, 6 * (1 + 2 * bands), H, W)``."""
    x = torch.cat([rays[:, :3] / origin_scale, rays[:, 3:]], dim=1)
    if bands == 0:
        return x
    freqs = 2.0 ** torch.arange(bands, device=rays.device, dtype=rays.dtype)
    angles = (x[:, None] * freqs[None, :, None, None, None]).flatten(1, 2)
    return torch.cat([x, torch.sin(angles), torch.cos(angles)], dim=1)


def plucker_coordinates(rays: torch.Tensor, origin_scale: float = 1.0) -> torch.Tensor:
    """``[d, o x d]`` of ``rays`` ``(N, 6, H, W)`` -> ``(N, 6, H, W)``."""
    origins, directions = rays[:, :3] / origin_scale, rays[:, 3:]
    return torch.cat([directions, torch.cross(origins, directions, dim=1)], dim=1)


class RayEncoding(nn.Module):
    """Encodes raw rays ``(N, 6, H, W)`` ``[origin, direction]`` into ``out_channels`` feature maps.

    * ``sinusoidal``: NeRF's positional encoding of origin and direction, ``6 * (1 + 2 * bands)``
      channels, frequencies ``2^0 .. 2^(bands-1)``. Few bands on purpose: a high band on the 24
      discrete NMR camera origins acts as a view-id code rather than geometry.
    * ``plucker``: Pluecker coordinates ``[d, o x d]`` (6 channels) followed by Gaussian Fourier
      features ``sin/cos(2 pi B p)`` of them (``2 * fourier_features`` channels). Pluecker coordinates
      identify the ray itself (they do not change when the origin slides along it) and are smooth in
      the camera pose; the random features are the "rays projected on a sphere, 512-d" idea of the
      SODA paper made concrete.

    Origins are divided by ``origin_scale`` (the NMR camera distance) so both encodings see
    coordinates of order one.
    """

    def __init__(
        self,
        kind: str = "plucker",
        sinusoidal_bands: int = 4,
        fourier_features: int = 16,
        fourier_scale: float = 1.0,
        origin_scale: float = 2.732,
        seed: int = 0,
    ):
        super().__init__()
        self.kind = kind
        self.sinusoidal_bands = sinusoidal_bands
        self.origin_scale = origin_scale
        self.out_channels = ray_encoding_channels(kind, sinusoidal_bands, fourier_features)
        generator = torch.Generator().manual_seed(seed)
        # Saved with the weights so a reloaded model sees exactly the same features.
        self.register_buffer("fourier_matrix", torch.randn(fourier_features, 6, generator=generator) * fourier_scale)

    def forward(self, rays: torch.Tensor) -> torch.Tensor:
        if self.kind == "sinusoidal":
            return sinusoidal_ray_encoding(rays, self.sinusoidal_bands, self.origin_scale)
        plucker = plucker_coordinates(rays, self.origin_scale)
        if self.fourier_matrix.shape[0] == 0:
            return plucker
        projected = 2 * math.pi * torch.einsum("fc,nchw->nfhw", self.fourier_matrix.to(rays.dtype), plucker)
        return torch.cat([plucker, torch.sin(projected), torch.cos(projected)], dim=1)


# --------------------------------------------------------------------------------------------------
# The encoder: source view(s) -> bottleneck latent ``z``


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
            :class:`RayEncoding`.
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
        backbone: ``"conv"``, the stem and stages above (Diffusers' ``ResnetBlock2D``, GroupNorm), or
            ``"resnet"``, ``transformers``' ``ResNetModel`` (BatchNorm, as the paper's ResNet-50 for NMR),
            randomly initialised and trained with the rest; it takes the same image and ray channels and
            feeds the same head (``pooling``, ``thumbnail_size``, ``latent_norm``). It needs
            ``transformers`` installed; the default does not.
        resnet_layer_type, resnet_depths, resnet_hidden_sizes, resnet_embedding_size: the ``ResNetConfig``
            of ``backbone="resnet"`` (``layer_type``, ``depths``, ``hidden_sizes``, ``embedding_size``);
            the defaults are ResNet-50's.
        resnet_stem: ``"small"``, a stride-1 3x3 convolution as the conv backbone's, or ``"imagenet"``,
            ``ResNetModel``'s own 7x7 stride-2 convolution and max pool (4x fewer positions per side).
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
        backbone: str = "conv",
        resnet_layer_type: str = "bottleneck",
        resnet_depths: tuple[int, ...] = (3, 4, 6, 3),
        resnet_hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048),
        resnet_embedding_size: int = 64,
        resnet_stem: str = "small",
    ):
        super().__init__()
        if backbone not in ("conv", "resnet"):
            raise ValueError(f"backbone: expected 'conv' or 'resnet', got {backbone!r}")
        if backbone == "resnet":
            if resnet_layer_type not in ("basic", "bottleneck"):
                raise ValueError(f"resnet_layer_type: expected 'basic' or 'bottleneck', got {resnet_layer_type!r}")
            if resnet_stem not in ("small", "imagenet"):
                raise ValueError(f"resnet_stem: expected 'small' or 'imagenet', got {resnet_stem!r}")
            if not resnet_depths or len(resnet_depths) != len(resnet_hidden_sizes):
                raise ValueError(
                    f"resnet_depths, resnet_hidden_sizes: expected one entry per stage each, got "
                    f"{list(resnet_depths)} and {list(resnet_hidden_sizes)}"
                )
            stem_stride = 4 if resnet_stem == "imagenet" else 1
            halvings, stages_argument = len(resnet_depths) - 1, "resnet_depths"
        else:
            stem_stride, halvings, stages_argument = 1, len(block_out_channels) - 1, "block_out_channels"
        if sample_size % (patch_size * stem_stride * 2**halvings):
            raise ValueError(
                f"sample_size: {sample_size} cannot be split in {patch_size}-pixel patches"
                + (f", reduced {stem_stride}x by the stem" if stem_stride > 1 else "")
                + f" and halved {halvings} times ({stages_argument})"
            )
        ray_channels = 0
        if use_source_rays:
            self.ray_embedding = RayEncoding(
                ray_encoding, ray_sinusoidal_bands, ray_fourier_features, ray_fourier_scale
            )
            ray_channels = self.ray_embedding.out_channels
            # A single source view seen from its own camera: origin 0, directions set by the lens
            # (its unprojection is the inverse of the intrinsics diag(f, f, 1, 1), f = 1 / tan(fov / 2)).
            half_width = math.tan(math.radians(fov_deg) / 2)
            unprojection = torch.diag(torch.tensor([half_width, half_width, 1.0, 1.0], dtype=torch.float64))
            canonical = camera_rays(torch.eye(4, dtype=torch.float64)[None], unprojection[None], sample_size)
            self.register_buffer("canonical_rays", canonical, persistent=False)

        if pooling not in ("mean", "flatten"):
            raise ValueError(f"pooling: expected 'mean' or 'flatten', got {pooling!r}")
        backbone_channels = (in_channels + ray_channels) * patch_size**2
        if backbone == "resnet":
            self.resnet = _ResNetBackbone(
                backbone_channels, resnet_layer_type, resnet_depths, resnet_hidden_sizes, resnet_embedding_size,
                resnet_stem,
            )
            channels = resnet_hidden_sizes[-1]
        else:
            self.conv_in = nn.Conv2d(backbone_channels, block_out_channels[0], 3, padding=1)
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
        final_size = sample_size // (patch_size * stem_stride * 2**halvings)
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

        x = nn.functional.pixel_unshuffle(x, config.patch_size)
        if config.backbone == "resnet":
            h = self.resnet(x)  # already normalised and activated: its blocks end in BatchNorm, ReLU
        else:
            h = self.conv_in(x)
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


class _ResNetBackbone(nn.Module):
    """``transformers``' ``ResNetModel``, randomly initialised and trained with the rest, without its
    pooler: ``(B, num_channels, H, W)`` -> its last feature map. Its stages run one by one so that
    gradient checkpointing, like the conv backbone's, recomputes one stage at a time (their BatchNorms
    then update their running statistics twice per step)."""

    def __init__(self, num_channels: int, layer_type: str, depths: tuple[int, ...], hidden_sizes: tuple[int, ...],
                 embedding_size: int, stem: str):
        super().__init__()
        import importlib

        try:
            # Lazily, via importlib (diffusers scans indented imports too): the default backbone keeps the bundle free of transformers.
            resnet = importlib.import_module("transformers.models.resnet.modeling_resnet")
        except ImportError as error:
            raise ImportError(
                "SODAEncoder(backbone='resnet') is built from transformers' ResNetModel, which could not be imported "
                f"({error}): `pip install transformers`, or use backbone='conv'"
            ) from error
        config = resnet.ResNetConfig(
            num_channels=num_channels, embedding_size=embedding_size, hidden_sizes=list(hidden_sizes),
            depths=list(depths), layer_type=layer_type, hidden_act="relu",
        )
        self.model = resnet.ResNetModel(config)
        if stem == "small":  # a stride-1 3x3 convolution and no max pool, as the conv backbone's stem
            conv = resnet.ResNetConvLayer(num_channels, embedding_size, kernel_size=3, stride=1, activation="relu")
            nn.init.kaiming_normal_(conv.convolution.weight, mode="fan_out", nonlinearity="relu")
            self.model.embedder.embedder = conv
            self.model.embedder.pooler = nn.Identity()
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model.embedder(x)
        for stage in self.model.encoder.stages:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                h = self._gradient_checkpointing_func(stage, h)
            else:
                h = stage(h)
        return h

# --------------------------------------------------------------------------------------------------
# The U-Net: the denoiser, a UNet2DModel variant whose every ResNet block is modulated by ``z`` (AdaGN)


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


class SODAUNet2DModel(ModelMixin, ConfigMixin, AttentionMixin):
    r"""U-Net denoiser of SODA: sees the noisy target, the target's ray encoding (extra input
    channels) and the latent ``z`` (AdaGN in every ResNet block), nothing else.

    Levels: ``len(block_out_channels)`` down levels, a middle, and as many up levels. With
    ``layerwise_modulation`` the latent is split into ``levels + 1`` chunks: chunk ``i`` modulates
    down level ``i`` and its mirror up level, the last chunk the middle. With
    ``cross_attention_resolutions``, blocks at those resolutions also attend to ``z`` split into
    ``latent_tokens`` tokens (SODA's 3D setting uses cross-attention beside AdaGN): each position
    reads what it needs of the latent, where AdaGN gives every position the same scale and shift.
    The model itself never drops ``z``: the training script does (``--z_drop_prob``, ``--layer_mask_prob``), so that
    ``train()`` mode samples as ``eval()`` does and the config holds only what sampling needs.

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
        layerwise_modulation: see above.
        ray_encoding, ray_sinusoidal_bands, ray_fourier_features, ray_fourier_scale: see
            :class:`RayEncoding`.
        patch_size: the U-Net works on ``patch_size x patch_size`` pixel patches folded into channels
            (pixel unshuffle), ``patch_size**2`` times fewer positions: the cheapest way to spend a CPU's
            few FLOPs on depth and width rather than on full-resolution convolutions.
        cross_attention_resolutions: resolutions (in positions, after patching) whose blocks get a
            cross-attention layer to the latent tokens; empty: AdaGN only.
        latent_tokens: how many tokens ``z`` is split into for cross-attention (``latent_dim`` must be a
            multiple); each is embedded by one shared linear map plus a learnt embedding of its index.
    """

    _supports_gradient_checkpointing = True
    # Training settings that configs saved before the training script took them over still hold: dropped on load.
    _moved_to_training = ("z_drop_prob", "layer_mask_prob")

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        config_dict = {key: value for key, value in config_dict.items() if key not in cls._moved_to_training}
        return super().extract_init_dict(config_dict, **kwargs)

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
                **cross,
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
