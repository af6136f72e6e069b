"""Image metrics for novel view synthesis: PSNR, SSIM, LPIPS (VGG), FID, foreground IoU and colour
error, and their aggregation.

The single-view NMR protocol of pixelNeRF: PSNR and SSIM on images in [0, 1], LPIPS (VGG) on
images in [-1, 1], each averaged over an object's target views, then over objects (:func:`aggregate`).
SSIM comes twice: :func:`ssim` (Gaussian window, the usual modern choice) and :func:`ssim_pixelnerf`
(skimage's uniform window with sample covariances, the numbers pixelNeRF published). PSNR rewards
blurry means of the plausible views; :func:`foreground_iou` (is the silhouette right?) and
:func:`foreground_color_error` (is the object's colour right?) say what a person looking at the
views sees first.

Pretrained networks are never downloaded: LPIPS needs torchvision's ImageNet VGG16 checkpoint and
FID the TensorFlow FID Inception converted to PyTorch; both are read from local files (explicit path,
then an environment variable, then the torch hub cache) and a :class:`MissingWeightsError` says which
file is missing and where to put it. Neither needs torchvision, which does not import beside the torch
build this project runs on: the networks are rebuilt here with the parameter names of the checkpoints.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

PSNR_MAX = 100.0
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # torchmetrics' Gaussian window: int(3.5 * sigma + 0.5) taps each side -> 11x11
SSIM_PIXELNERF_WINDOW = 7  # skimage's default win_size, which pixelNeRF's compare_ssim call kept
# NMR renders objects on a pure white background (255, 255, 255); only anti-aliased silhouette edges
# blend into it. A pixel is foreground when its darkest channel is at most 239 of 255 (below 240/255):
# edge pixels that carry a visible part of the object count, and the faint off-white haze a sampler
# leaves on the background does not. The cut sits half a level below 240 so that 8-bit values that went
# through [-1, 1] and back never land on it. An object painted near-white is partly invisible to it.
FOREGROUND_THRESHOLD = 239.5 / 255
# The palest foreground: a pixel whose darkest channel is 208-238 of 255. Samples of an unsure model draw
# a rim of such pixels around their objects (docs/results.md#colour-error).
LIGHT_GREY = (207.5 / 255, 238.5 / 255)

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
INCEPTION_FILENAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"


class MissingWeightsError(FileNotFoundError):
    """A pretrained network's weights file is not on this machine (nothing is downloaded at run time)."""


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _find_weights(path, env_var: str, filenames: Sequence[str], what: str, argument: str, url: str) -> Path:
    """Explicit ``path``, else ``$env_var``, else the first of ``filenames`` in the torch hub cache."""
    for given, source in ((path, argument), (os.environ.get(env_var) or None, f"${env_var}")):
        if given is not None:
            given = Path(given).expanduser()
            if not given.is_file():
                raise MissingWeightsError(f"{what}: {source} points to {given}, which is not a file ({url})")
            return given
    cache = _hub_checkpoints()
    for filename in filenames:
        if (cache / filename).is_file():
            return cache / filename
    raise MissingWeightsError(
        f"{what} needs {filenames[0]} ({url}): pass {argument}=..., set ${env_var}, or put it in {cache}/"
    )


# --------------------------------------------------------------------------------------- PSNR / SSIM


def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, ``10 log10(1 / MSE)``, of ``(N, 3, H, W)`` images in [0, 1] -> ``(N,)``.

    Both images are clipped to [0, 1] first (the image a viewer sees). Identical images have an
    infinite PSNR; it is capped at ``PSNR_MAX`` = 100 dB (MSE 1e-10) so that averages stay finite.
    """
    pred, target = pred.float().clamp(0, 1), target.float().clamp(0, 1)
    value = peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return value.clamp(max=PSNR_MAX)


def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of ``(N, C, H, W)`` images in [0, 1] -> ``(N,)``.

    Window: Gaussian, 11x11, sigma 1.5 (torchmetrics' default and Wang et al.'s), K1 = 0.01,
    K2 = 0.03, local statistics with population (not sample) variances. The SSIM map is averaged
    over the valid region only -- the 5-pixel border whose window would leave the image is dropped,
    as in Wang et al.'s reference code and skimage -- and over channels. (torchmetrics itself averages
    the whole map, borders computed on mirror-padded images; on a 64 px view that border is 29% of
    the pixels.) pixelNeRF's published SSIM used skimage's default 7x7 uniform window with sample
    variances, so its numbers are close to, not identical with, these; :func:`ssim_pixelnerf` gives those.
    Images are clipped to [0, 1] first; H and W must be at least 11.
    """
    pred, target = pred.float().clamp(0, 1), target.float().clamp(0, 1)
    _, ssim_map = structural_similarity_index_measure(
        pred,
        target,
        gaussian_kernel=True,
        sigma=SSIM_SIGMA,
        data_range=1.0,
        reduction="none",
        return_full_image=True,
    )
    r = SSIM_RADIUS
    return ssim_map[..., r:-r, r:-r].mean(dim=(1, 2, 3))


def ssim_pixelnerf(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM as pixelNeRF reported it, of ``(N, C, H, W)`` images in [0, 1] -> ``(N,)``.

    pixelNeRF scored with ``skimage.measure.compare_ssim(..., multichannel=True, data_range=1)``, i.e.
    skimage's defaults: a 7x7 uniform window, sample (ddof 1) variances and covariance (the window
    statistics times 49/48), K1 = 0.01, K2 = 0.03, each channel's SSIM map averaged over the valid
    region (3 pixels cropped on each side, where the window stays inside the image), then the mean
    over channels. Written out here because torchmetrics has no uniform-window, sample-covariance mode;
    computed in float64 so that the differences of window moments keep their digits. Images are
    clipped to [0, 1] first; H and W must be at least 7.
    """
    pred, target = pred.double().clamp(0, 1), target.double().clamp(0, 1)
    window = SSIM_PIXELNERF_WINDOW
    stacked = torch.cat([pred, target, pred * pred, target * target, pred * target])
    moments = F.avg_pool2d(stacked, window, stride=1)  # the valid region only: no padding
    mean_x, mean_y, mean_xx, mean_yy, mean_xy = moments.chunk(5)
    cov_norm = window**2 / (window**2 - 1)
    var_x, var_y = cov_norm * (mean_xx - mean_x**2), cov_norm * (mean_yy - mean_y**2)
    cov_xy = cov_norm * (mean_xy - mean_x * mean_y)
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * cov_xy + c2)) / (
        (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    )
    # Every channel's map has the same size, so one mean is the mean of the per-channel means.
    return ssim_map.mean(dim=(1, 2, 3)).float()


# --------------------------------------------------------------------------------------- foreground


def foreground_mask(images: torch.Tensor) -> torch.Tensor:
    """Object pixels of ``(N, 3, H, W)`` images in [0, 1] on NMR's white background -> bool ``(N, H, W)``:
    those whose darkest channel is below :data:`FOREGROUND_THRESHOLD` (at most 239 of 255).
    Images are clipped to [0, 1] first."""
    return images.float().clamp(0, 1).amin(dim=1) < FOREGROUND_THRESHOLD


def light_grey_percent(images: torch.Tensor) -> torch.Tensor:
    """Per-image share of light grey pixels (darkest channel 208-238 of 255, :data:`LIGHT_GREY`) of
    ``(N, 3, H, W)`` images in [0, 1], in percent: ``(N,)``. A generated view's value over its target's
    measures the pale rim that samples draw around objects."""
    darkest = images.float().clamp(0, 1).amin(dim=1)
    return 100 * ((darkest >= LIGHT_GREY[0]) & (darkest < LIGHT_GREY[1])).float().mean(dim=(1, 2))


def foreground_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image intersection over union of the foreground masks (:func:`foreground_mask`) of
    ``(N, 3, H, W)`` images in [0, 1] -> ``(N,)`` in [0, 1]: is the silhouette where it should be?

    When neither image has a foreground pixel the masks agree perfectly and the IoU is 1.0; when only
    one has, it is 0. (torchmetrics' Jaccard index pools a whole batch; this is one value per view.)
    """
    pred_mask, target_mask = foreground_mask(pred), foreground_mask(target)
    intersection = (pred_mask & target_mask).sum(dim=(1, 2))
    union = (pred_mask | target_mask).sum(dim=(1, 2))
    iou = intersection.float() / union.clamp(min=1).float()
    return torch.where(union == 0, torch.ones_like(iou), iou)


def mean_foreground_color(images: torch.Tensor) -> torch.Tensor:
    """The mean colour of each image's foreground (:func:`foreground_mask`), in 0-255 RGB: ``(N, 3)``.

    An image without a foreground pixel gets the mean colour of the whole image (near white): a view
    that lost its object is then as far from the target's colour as a white patch, never left out of
    the averages (leaving it out would reward samplers that draw nothing where they are unsure).
    """
    images = images.float().clamp(0, 1)
    mask = foreground_mask(images).unsqueeze(1)
    images = images * 255
    count = mask.sum(dim=(2, 3))
    foreground_mean = (images * mask).sum(dim=(2, 3)) / count.clamp(min=1)
    return torch.where(count > 0, foreground_mean, images.mean(dim=(2, 3)))


def foreground_color_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image Euclidean distance between the mean foreground colours (:func:`mean_foreground_color`,
    each image over its own mask) of ``(N, 3, H, W)`` images in [0, 1] -> ``(N,)``, in 0-255 RGB units
    (0 to 255 * sqrt(3) = 441.7): is the object the right colour, wherever it was drawn?

    An image with an empty mask contributes the mean of the whole image (near white), so the value is
    always finite: about 0 when both masks are empty, large when only the generated view lost the object.
    """
    return (mean_foreground_color(pred) - mean_foreground_color(target)).norm(dim=1)


def foreground_color_error_parts(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`foreground_color_error` split into ``(brightness, chroma)``, each ``(N,)`` in 0-255 RGB units,
    with ``brightness**2 + chroma**2 == error**2``: the part of the difference of mean colours along the
    grey axis (too light or too dark: the shading, or a pale rim drawn around the object, which counts
    as foreground: docs/results.md#colour-error) and the part across it (the wrong hue or saturation)."""
    difference = mean_foreground_color(pred) - mean_foreground_color(target)
    grey = difference.mean(dim=1, keepdim=True).expand_as(difference)
    return grey.norm(dim=1), (difference - grey).norm(dim=1)


# --------------------------------------------------------------------------------------- LPIPS

# VGG16 configuration "D" (Simonyan & Zisserman 2015) as torchvision lays out ``vgg16().features``.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# Indices in ``features`` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the layers LPIPS compares.
VGG16_LPIPS_TAPS = (3, 8, 15, 22, 29)
VGG16_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class VGG16Features(nn.Sequential):
    """torchvision's ``vgg16().features`` (same layers, same state-dict keys ``0.weight``, ``2.weight``, ...)
    returning the feature maps at ``taps`` (default: the five LPIPS layers) instead of the last output.
    """

    def __init__(self, taps: Sequence[int] = VGG16_LPIPS_TAPS):
        layers, channels = [], 3
        for spec in VGG16_LAYERS:
            if spec == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, spec, kernel_size=3, padding=1), nn.ReLU()]
                channels = spec
        super().__init__(*layers)
        self.taps = tuple(taps)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # torchvision's init: keeps random-weight activations O(1)
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for index, layer in enumerate(self):
            x = layer(x)
            if index in self.taps:
                features.append(x)
                if len(features) == len(self.taps):
                    break
        return features

    def load_torchvision_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], assign: bool = False
    ) -> None:
        """Load a ``vgg16()`` checkpoint (keys ``features.0.weight``, ..., ``classifier.*`` ignored) or a
        ``vgg16().features`` state dict (keys ``0.weight``, ...)."""
        if any(key.startswith("features.") for key in state_dict):
            state_dict = {
                k[len("features.") :]: v for k, v in state_dict.items() if k.startswith("features.")
            }
        self.load_state_dict(state_dict, assign=assign)


def _lpips_lin_weights_path(lin_path) -> Path:
    """The lpips package's v0.1 ``vgg.pth``; torchmetrics ships a copy with the same tensors."""
    import torchmetrics

    given = lin_path if lin_path is not None else os.environ.get("SODA_LPIPS_LIN") or None
    bundled = Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "vgg.pth"
    path = bundled if given is None else Path(given).expanduser()
    if not path.is_file():
        raise MissingWeightsError(
            f"LPIPS linear layers need the lpips package's weights/v0.1/vgg.pth: {path} is not a file; "
            "pass lin_path=... or set $SODA_LPIPS_LIN"
        )
    return path


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity (Zhang et al. 2018), "lin" version 0.1.

        d(x0, x1) = sum_l mean_hw || w_l * (f_l(x0) / |f_l(x0)| - f_l(x1) / |f_l(x1)|) ||^2

    where ``f_l`` are feature maps of ``features`` (VGG16 relu1_2 ... relu5_3 by default), normalised to
    unit length over channels, and ``w_l`` non-negative per-channel weights (the 1x1 "lin" layers).
    Images are ``(N, 3, H, W)`` in [-1, 1] (clipped to it), shifted and scaled as the lpips package does
    before they enter ``features``; the result is per image, ``(N,)``.

    ``features`` can be any module mapping images to a list of feature maps whose channel counts are
    ``channels``; :meth:`from_pretrained` builds the VGG16 one from local weights files.
    """

    def __init__(self, features: nn.Module | None = None, channels: Sequence[int] = VGG16_LPIPS_CHANNELS):
        super().__init__()
        self.features = VGG16Features() if features is None else features
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in channels)
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(
        cls, vgg_path: str | os.PathLike | None = None, lin_path: str | os.PathLike | None = None
    ):
        """LPIPS-VGG from local files, never downloading.

        ``vgg_path``: torchvision's ImageNet VGG16 checkpoint ``vgg16-397923af.pth``; else
        ``$SODA_LPIPS_VGG``; else ``<torch hub dir>/checkpoints/vgg16-397923af.pth`` (``torch.hub.get_dir()``,
        ``~/.cache/torch/hub`` unless ``$TORCH_HOME`` says otherwise), where torchvision would cache it.
        ``lin_path``: the lpips package's ``weights/v0.1/vgg.pth`` (keys ``lin{i}.model.1.weight``); else
        ``$SODA_LPIPS_LIN``; else the copy that ships inside torchmetrics.
        Raises :class:`MissingWeightsError` when a file is missing.
        """
        vgg_file = _find_weights(
            vgg_path, "SODA_LPIPS_VGG", (VGG16_FILENAME,), "LPIPS (VGG)", "vgg_path", VGG16_URL
        )
        lin_file = _lpips_lin_weights_path(lin_path)
        with torch.device("meta"):  # no random init of weights that are overwritten next
            features = VGG16Features()
        features.load_torchvision_state_dict(
            torch.load(vgg_file, map_location="cpu", weights_only=True), assign=True
        )
        model = cls(features=features)
        model.load_lin_state_dict(torch.load(lin_file, map_location="cpu", weights_only=True))
        return model.eval().requires_grad_(False)

    def load_lin_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the lpips package's linear layers: ``lin{i}.model.{1 with dropout, 0 without}.weight``."""
        weights = {}
        for key, value in state_dict.items():
            match = re.fullmatch(r"lin(\d+)\.model\.\d+\.weight", key)
            if match is None:
                raise KeyError(f"unexpected key {key!r} in an LPIPS linear-layer state dict")
            weights[f"{match.group(1)}.weight"] = value
        self.lins.load_state_dict(weights)

    def forward(self, image0: torch.Tensor, image1: torch.Tensor) -> torch.Tensor:
        batch = image0.shape[0]
        images = torch.cat([image0, image1]).clamp(-1, 1)
        features = self.features((images - self.shift) / self.scale)
        distance = 0.0
        for feature, lin in zip(features, self.lins, strict=True):
            # lpips' normalize_tensor: x / (||x||_channels + 1e-10)
            feature = feature / (feature.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)
            difference = (feature[:batch] - feature[batch:]).square()
            distance = distance + lin(difference).mean(dim=(1, 2, 3))
        return distance


# --------------------------------------------------------------------------------------- FID


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 in [0, 255]: clipped, then rounded to the nearest level (not floored)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1's ``resize_bilinear(align_corners=False)``, the resize of the original FID code.

    It samples the source at ``dst * in / out`` (no half-pixel offset, unlike ``F.interpolate``),
    clamping the upper neighbour at the border.
    """

    def axis(in_size: int):
        position = torch.arange(size, dtype=torch.float32, device=images.device) * (in_size / size)
        low = position.long()
        return low, (low + 1).clamp(max=in_size - 1), (position - low).to(images.dtype)

    y0, y1, wy = axis(images.shape[-2])
    x0, x1, wx = axis(images.shape[-1])
    # x first, then y: torch-fidelity's order, so that the rounding is the same too
    top, bottom = images[..., y0, :], images[..., y1, :]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * wx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * wx
    return top + (bottom - top) * wy[:, None]


class _BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **conv):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x):
    # TensorFlow's average pool leaves the zero padding out of the average.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = _BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = _BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_avg_pool_3x3(x))], 1)


class _InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = _BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = _BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = _BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = _BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            branch7x7dbl = layer(branch7x7dbl)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_avg_pool_3x3(x))], 1)


class _InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = _BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = _BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = _BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _InceptionE(nn.Module):
    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        # The FID graph's last block max-pools where the paper average-pools; kept for the weights' sake.
        self.max_pool = max_pool
        self.branch1x1 = _BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = _BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = _BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


class InceptionV3Features(nn.Module):
    """The FID Inception: TensorFlow's 2015-12-05 InceptionV3 graph (Heusel et al. 2017's FID code), in the
    layout and parameter names of torch-fidelity's ``FeatureExtractorInceptionV3``; with the same weights
    it gives the same features (checked on random weights against torch-fidelity 0.4.0's module).

    Input: uint8 images ``(N, 3, H, W)``, resized to 299x299 with TensorFlow 1's bilinear resize and
    mapped to ``(x - 128) / 128`` as in that graph. Output: the 2048-d pool3 features, ``(N, 2048)``.
    """

    num_features = 2048
    image_size = 299

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = _BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = _InceptionA(192, pool_features=32)
        self.Mixed_5c = _InceptionA(256, pool_features=64)
        self.Mixed_5d = _InceptionA(288, pool_features=64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, channels_7x7=128)
        self.Mixed_6c = _InceptionC(768, channels_7x7=160)
        self.Mixed_6d = _InceptionC(768, channels_7x7=160)
        self.Mixed_6e = _InceptionC(768, channels_7x7=192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, max_pool=False)
        self.Mixed_7c = _InceptionE(2048, max_pool=True)
        self.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.fc = nn.Linear(2048, 1008)  # unused for FID; present in the weights file

    @classmethod
    def from_pretrained(cls, weights_path: str | os.PathLike | None = None) -> InceptionV3Features:
        """Load torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` from ``weights_path``, else
        ``$SODA_FID_INCEPTION``, else the torch hub cache ``<torch.hub.get_dir()>/checkpoints/``, where
        torch-fidelity caches it. pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (the same graph,
        saved from torchvision's ``Inception3``, whose parameter names these are too) is also looked for
        there; a file whose keys do not match raises RuntimeError. Missing: :class:`MissingWeightsError`."""
        path = _find_weights(
            weights_path,
            "SODA_FID_INCEPTION",
            INCEPTION_FILENAMES,
            "FID (InceptionV3)",
            "weights_path",
            INCEPTION_URL,
        )
        state_dict = dict(torch.load(path, map_location="cpu", weights_only=True))
        with torch.device("meta"):  # no random init of 24M parameters that are overwritten next
            model = cls()
        for key in model.state_dict():
            # BatchNorm's num_batches_tracked counters may not have been saved; they are unused in eval
            if key.endswith("num_batches_tracked"):
                state_dict.setdefault(key, torch.tensor(0))
        try:
            model.load_state_dict(state_dict, assign=True)
        except RuntimeError as error:
            raise RuntimeError(f"{path} is not an FID Inception checkpoint: {error}") from error
        return model.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)  # BatchNorm statistics are part of the fixed network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"InceptionV3Features expects uint8 images, got {images.dtype} (see to_uint8)")
        x = resize_bilinear_tf1(images.float(), self.image_size)
        x = (x - 128) / 128
        for name in (
            "Conv2d_1a_3x3",
            "Conv2d_2a_3x3",
            "Conv2d_2b_3x3",
            "MaxPool_1",
            "Conv2d_3b_1x1",
            "Conv2d_4a_3x3",
            "MaxPool_2",
            "Mixed_5b",
            "Mixed_5c",
            "Mixed_5d",
            "Mixed_6a",
            "Mixed_6b",
            "Mixed_6c",
            "Mixed_6d",
            "Mixed_6e",
            "Mixed_7a",
            "Mixed_7b",
            "Mixed_7c",
            "AvgPool",
        ):
            x = getattr(self, name)(x)
        return x.flatten(1)


class _EightBitImages(nn.Module):
    """Feeds a feature extractor the uint8 version of float images in [0, 1], as they would be saved."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor
        if hasattr(extractor, "num_features"):
            self.num_features = extractor.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor(images if images.dtype == torch.uint8 else to_uint8(images))


def fid_metric(
    feature_extractor: nn.Module | None = None,
    weights_path: str | os.PathLike | None = None,
    probe_image_size: int = 64,
) -> FrechetInceptionDistance:
    """A fresh torchmetrics ``FrechetInceptionDistance`` (Heusel et al. 2017).

    ``feature_extractor``: any module mapping uint8 images ``(N, 3, H, W)`` to ``(N, D)`` features;
    default: :class:`InceptionV3Features` from local weights (see its ``from_pretrained``), which raises
    :class:`MissingWeightsError` if the file is missing. ``update(images, real=...)`` takes float images in
    [0, 1] (clipped and rounded to uint8 before the extractor sees them) or uint8 images. The extractor's
    ``num_features`` gives D; without it D is probed on one ``probe_image_size`` image.

    The metric accumulates until ``reset()``: use :func:`fid` to score two image sets, which resets first.
    """
    if feature_extractor is None:
        feature_extractor = InceptionV3Features.from_pretrained(weights_path)
    return FrechetInceptionDistance(
        feature=_EightBitImages(feature_extractor),
        reset_real_features=True,
        normalize=True,  # only tells torchmetrics to probe with float images, which _EightBitImages converts
        input_img_size=(3, probe_image_size, probe_image_size),
    )


@torch.no_grad()
def fid(
    metric: FrechetInceptionDistance,
    real_images: torch.Tensor | Iterable[torch.Tensor],
    generated_images: torch.Tensor | Iterable[torch.Tensor],
    batch_size: int = 64,
) -> float:
    """FID between two image sets (tensors, or iterables of batches), each with at least two images.

    Resets ``metric`` before and after, so one metric object scores any number of pairs of sets.
    """
    metric.reset()
    for images, real in ((real_images, True), (generated_images, False)):
        batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
        for batch in batches:
            metric.update(batch.to(metric.device), real=real)
    value = float(metric.compute())
    metric.reset()
    return value


# --------------------------------------------------------------------------------------- aggregation

METRICS = ("psnr", "ssim", "lpips")


def _mean(values: Iterable[float]) -> float:
    values = [float(v) for v in values]
    return math.fsum(values) / len(values)


def aggregate(records: Iterable[Mapping], metrics: Sequence[str] = METRICS) -> dict:
    """Per-view metric values -> per-object means -> means over objects, overall and per category.

    Each record: ``{"object_id", "category", "psnr": [per target view], "ssim": [...], "lpips": [...] or None}``.
    A metric that is None (or absent) in every record is reported as None; in only some records, it is an
    error (the averages would be over different objects). Returns plain JSON-able dicts::

        {"num_objects", "num_views", "psnr", "ssim", "lpips",
         "per_category": {category: {"num_objects", "num_views", "psnr", "ssim", "lpips"}}}
    """
    objects: dict[tuple[str, str], dict] = {}
    for record in records:
        key = (str(record["category"]), str(record["object_id"]))
        if key in objects:
            raise ValueError(f"object {key[1]!r} of category {key[0]!r} appears twice")
        means, num_views = {}, None
        for name in metrics:
            values = record.get(name)
            if values is None:
                means[name] = None
                continue
            values = [float(v) for v in values]
            if not values or (num_views is not None and len(values) != num_views):
                raise ValueError(
                    f"object {key[1]!r}: {name} has {len(values)} views, expected {num_views or '> 0'}"
                )
            num_views = len(values)
            means[name] = _mean(values)
        if num_views is None:
            raise ValueError(f"object {key[1]!r} has none of the metrics {tuple(metrics)}")
        objects[key] = {"num_views": num_views, **means}

    for name in metrics:
        present = {objects[key][name] is not None for key in objects}
        if len(present) > 1:
            raise ValueError(f"{name} is given for some objects and None for others")

    def summary(keys: list[tuple[str, str]]) -> dict:
        row = {"num_objects": len(keys), "num_views": sum(objects[k]["num_views"] for k in keys)}
        for name in metrics:
            values = [objects[k][name] for k in keys]
            row[name] = None if not keys or values[0] is None else _mean(values)
        return row

    keys = list(objects)
    result = summary(keys)
    result["per_category"] = {
        category: summary([k for k in keys if k[0] == category]) for category in sorted({k[0] for k in keys})
    }
    return result
