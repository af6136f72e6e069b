import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import TinyFeatures
from scipy import ndimage
from torch import nn

from soda_diffusers.evaluation.views import VIEW_METRICS, view_scores
from soda_diffusers.metrics import (
    FOREGROUND_THRESHOLD,
    LPIPS,
    PSNR_MAX,
    InceptionV3Features,
    MissingWeightsError,
    VGG16Features,
    aggregate,
    fid,
    fid_metric,
    foreground_color_error,
    foreground_color_error_parts,
    foreground_iou,
    foreground_mask,
    light_grey_percent,
    psnr,
    resize_bilinear_tf1,
    ssim,
    ssim_pixelnerf,
    to_uint8,
)


def smooth_images(seed: int, n: int = 3, height: int = 32, width: int = 40) -> np.ndarray:
    """Images with structure at several scales, in [0, 1]."""
    rng = np.random.default_rng(seed)
    images = ndimage.gaussian_filter(rng.random((n, 3, height, width)), sigma=(0, 0, 2, 2))
    images = (images - images.min()) / (images.max() - images.min())
    return np.clip(images + 0.05 * rng.standard_normal(images.shape), 0, 1)


@pytest.fixture
def no_weights_anywhere(monkeypatch, tmp_path):
    """An empty torch hub cache and no weight-path environment variables."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for name in ("SODA_LPIPS_VGG", "SODA_LPIPS_LIN", "SODA_FID_INCEPTION"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


# ------------------------------------------------------------------------------------ PSNR / SSIM


def test_psnr_matches_numpy_per_image():
    target = smooth_images(0)
    pred = np.clip(target + np.array([0.01, 0.05, 0.2])[:, None, None, None] * smooth_images(1), 0, 1)
    expected = 10 * np.log10(1.0 / ((pred - target) ** 2).mean(axis=(1, 2, 3)))
    value = psnr(torch.from_numpy(pred).float(), torch.from_numpy(target).float())
    assert value.shape == (3,)
    np.testing.assert_allclose(value.numpy(), expected, atol=1e-3)
    assert value[0] > value[1] > value[2]


def test_psnr_clips_inputs_and_caps_identical_images():
    target = torch.from_numpy(smooth_images(2)).float()
    assert torch.equal(psnr(target, target), torch.full((3,), PSNR_MAX))
    overshoot = target + 0.5  # seen as the clipped image
    torch.testing.assert_close(psnr(overshoot, target), psnr(overshoot.clamp(0, 1), target))
    assert torch.isfinite(psnr(overshoot, target)).all()


def reference_ssim(pred: np.ndarray, target: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Wang et al. 2004 with a Gaussian window, averaged over the valid region and channels."""
    c1, c2 = 0.01**2, 0.03**2

    def blur(x):
        return ndimage.gaussian_filter(x, sigma=sigma, truncate=radius / sigma, mode="constant")

    values = []
    for x, y in zip(pred.astype(np.float64), target.astype(np.float64)):
        maps = []
        for xc, yc in zip(x, y):
            mx, my = blur(xc), blur(yc)
            vx, vy, cxy = blur(xc * xc) - mx**2, blur(yc * yc) - my**2, blur(xc * yc) - mx * my
            s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            maps.append(s[radius:-radius, radius:-radius])
        values.append(np.mean(maps))
    return np.array(values)


def test_ssim_matches_scipy_reference_on_the_valid_region():
    target = smooth_images(3)
    pred = np.clip(target + np.array([0.02, 0.1, 0.3])[:, None, None, None] * smooth_images(4), 0, 1)
    expected = reference_ssim(pred, target)
    value = ssim(torch.from_numpy(pred).float(), torch.from_numpy(target).float())
    assert value.shape == (3,)
    np.testing.assert_allclose(value.numpy(), expected, atol=2e-5)
    assert 0.2 < expected[2] < expected[1] < expected[0] < 1  # the fixture is not degenerate


def test_ssim_of_identical_images_is_one():
    images = torch.from_numpy(smooth_images(5)).float()
    torch.testing.assert_close(ssim(images, images), torch.ones(3))


def reference_ssim_pixelnerf(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """skimage's structural_similarity with its defaults (what pixelNeRF's compare_ssim call used), written
    out: per channel, float64, 7x7 uniform_filter, sample covariances (49/48), map cropped by 3, mean;
    then the mean over channels."""
    win, c1, c2 = 7, 0.01**2, 0.03**2
    cov_norm = win**2 / (win**2 - 1)

    def filt(x):
        return ndimage.uniform_filter(x, size=win)

    values = []
    for x, y in zip(pred.astype(np.float64), target.astype(np.float64)):
        per_channel = []
        for xc, yc in zip(x, y):
            ux, uy = filt(xc), filt(yc)
            vx = cov_norm * (filt(xc * xc) - ux * ux)
            vy = cov_norm * (filt(yc * yc) - uy * uy)
            vxy = cov_norm * (filt(xc * yc) - ux * uy)
            s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
            pad = (win - 1) // 2
            per_channel.append(s[pad:-pad, pad:-pad].mean())
        values.append(np.mean(per_channel))
    return np.array(values)


def test_ssim_pixelnerf_matches_a_skimage_style_reference():
    rng = np.random.default_rng(6)
    noise_target = rng.random((2, 3, 20, 27))  # no structure at all, non-square
    noise_pred = np.clip(noise_target + 0.3 * rng.standard_normal(noise_target.shape), 0, 1)
    target = smooth_images(3)
    pred = np.clip(target + np.array([0.02, 0.1, 0.3])[:, None, None, None] * smooth_images(4), 0, 1)
    for p, t in ((pred, target), (noise_pred, noise_target)):
        expected = reference_ssim_pixelnerf(p, t)
        value = ssim_pixelnerf(torch.from_numpy(p).float(), torch.from_numpy(t).float())
        assert value.shape == (len(p),) and value.dtype == torch.float32
        np.testing.assert_allclose(value.numpy(), expected, atol=1e-5)
    assert 0.2 < expected.min() < expected.max() < 0.99  # the fixture is not degenerate
    # A window of 7 and sample covariances are not the Gaussian 11x11 of ssim(): the two differ.
    assert not np.allclose(ssim_pixelnerf(torch.from_numpy(pred), torch.from_numpy(target)).numpy(),
                           ssim(torch.from_numpy(pred).float(), torch.from_numpy(target).float()).numpy(), atol=1e-3)


def test_ssim_pixelnerf_of_identical_images_is_one_and_clips():
    images = torch.from_numpy(smooth_images(5)).float()
    torch.testing.assert_close(ssim_pixelnerf(images, images), torch.ones(3))
    flat = torch.full((1, 3, 7, 7), 0.5)  # the smallest size: one window
    torch.testing.assert_close(ssim_pixelnerf(flat, flat), torch.ones(1))
    overshoot = images + 0.5
    torch.testing.assert_close(ssim_pixelnerf(overshoot, images), ssim_pixelnerf(overshoot.clamp(0, 1), images))


# ------------------------------------------------------------------------------------ foreground


def canvas(height: int = 4, width: int = 5, **patches) -> torch.Tensor:
    """One white image ``(1, 3, H, W)`` in [0, 1] with flat-coloured patches: ``name=(rows, cols, rgb255)``."""
    image = torch.ones(1, 3, height, width)
    for rows, cols, rgb in patches.values():
        image[0, :, rows, cols] = torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 255
    return image


def test_foreground_is_a_darkest_channel_at_most_239_of_255():
    levels = torch.arange(256, dtype=torch.uint8)
    # Every 8-bit grey level, and one channel at that level with the others white, through [-1, 1] and back
    grey = levels.view(1, 1, 1, 256).expand(1, 3, 1, 256)
    one_channel = torch.full((1, 3, 1, 256), 255, dtype=torch.uint8)
    one_channel[:, 1] = levels
    for image in (grey, one_channel):
        model_range = image.float() / 127.5 - 1
        mask = foreground_mask((model_range + 1) / 2)[0, 0]
        assert mask.tolist() == [level <= 239 for level in range(256)]
    assert 239 / 255 < FOREGROUND_THRESHOLD < 240 / 255


def test_light_grey_is_a_darkest_channel_from_208_to_238_of_255():
    levels = torch.arange(256, dtype=torch.uint8)
    one_channel = torch.full((1, 3, 1, 256), 255, dtype=torch.uint8)
    one_channel[:, 2] = levels  # one pixel per level of the darkest channel, the others white
    model_range = one_channel.float() / 127.5 - 1  # through [-1, 1] and back, as generated views come
    percent = light_grey_percent((model_range + 1) / 2)
    torch.testing.assert_close(percent, torch.tensor([100 * 31 / 256]))  # levels 208..238
    assert light_grey_percent(canvas()).item() == 0.0


def test_foreground_iou_on_hand_made_masks():
    target = canvas(square=(slice(0, 2), slice(0, 2), (200, 30, 30)))  # 4 foreground pixels
    shifted = canvas(square=(slice(0, 2), slice(1, 4), (10, 10, 10)))  # 6 pixels, 2 shared: 2 / 8
    empty, faint = canvas(), canvas(haze=(slice(None), slice(None), (250, 245, 240)))  # no foreground
    pred = torch.cat([target, shifted, empty, empty, faint, target])
    targets = torch.cat([target, target, target, empty, empty, faint])
    iou = foreground_iou(pred, targets)
    assert iou.shape == (6,)
    torch.testing.assert_close(iou, torch.tensor([1.0, 2 / 8, 0.0, 1.0, 1.0, 0.0]))


def test_foreground_color_error_on_flat_colours():
    red = canvas(square=(slice(0, 2), slice(0, 2), (255, 0, 0)))
    blue_elsewhere = canvas(square=(slice(2, 4), slice(1, 5), (0, 0, 255)))
    # Half dark red, half light red: the mean foreground colour is (150, 0, 0)
    two_reds = canvas(a=(slice(0, 1), slice(None), (100, 0, 0)), b=(slice(1, 2), slice(None), (200, 0, 0)))
    empty, tinted = canvas(), canvas(haze=(slice(None), slice(None), (250, 250, 250)))
    pred = torch.cat([red, blue_elsewhere, two_reds, empty, tinted])
    targets = torch.cat([red, red, red, red, empty])
    error = foreground_color_error(pred, targets)
    assert error.shape == (5,)
    expected = [
        0.0,
        math.hypot(255, 255),  # where the object is does not matter, only its colour
        105.0,  # (150, 0, 0) against (255, 0, 0)
        math.hypot(255, 255),  # no foreground: the whole image's mean, white, against red
        math.sqrt(3) * 5,  # neither has foreground: the two whole-image means, both near white
    ]
    torch.testing.assert_close(error, torch.tensor(expected), atol=1e-3, rtol=0)
    assert torch.isfinite(error).all()


def test_view_scores_keeps_its_keys_and_adds_the_new_metrics():
    target = canvas(8, 8, square=(slice(2, 6), slice(2, 6), (30, 60, 90))).expand(2, -1, -1, -1) * 2 - 1
    generated = torch.stack([target[0], torch.ones(3, 8, 8)])  # perfect; white (object lost)
    scores = view_scores(generated, target)
    assert tuple(scores) == VIEW_METRICS and {"psnr", "ssim"} <= set(scores)
    assert all(isinstance(v, list) and len(v) == 2 for v in scores.values())
    assert scores["psnr"][0] == PSNR_MAX and scores["fg_iou"] == [1.0, 0.0]
    assert scores["ssim_pixelnerf"][0] == pytest.approx(1.0) and scores["fg_color_error"][0] == 0.0
    assert scores["fg_color_error"][1] == pytest.approx(math.dist((30, 60, 90), (255, 255, 255)), abs=1e-3)


# ------------------------------------------------------------------------------------ LPIPS


def random_lin_state_dict(channels, generator) -> dict:
    # lpips' own key names; its learned weights are non-negative
    return {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) for i, c in enumerate(channels)
    }


def tiny_lpips() -> LPIPS:
    torch.manual_seed(0)
    model = LPIPS(features=TinyFeatures(), channels=(8, 16))
    model.load_lin_state_dict(random_lin_state_dict((8, 16), torch.Generator().manual_seed(1)))
    return model.eval()


def test_lpips_with_a_custom_extractor_is_zero_symmetric_and_positive():
    model = tiny_lpips()
    a = torch.from_numpy(smooth_images(6, n=2)).float() * 2 - 1
    b = torch.from_numpy(smooth_images(7, n=2)).float() * 2 - 1
    with torch.no_grad():
        same, ab, ba = model(a, a), model(a, b), model(b, a)
    assert same.shape == (2,)
    assert torch.equal(same, torch.zeros(2))
    assert (ab > 1e-3).all()
    torch.testing.assert_close(ab, ba)
    with torch.no_grad():  # a closer image is closer
        assert (model(a, (a + 0.1 * (b - a))) < ab).all()


def test_vgg16_features_have_torchvision_layout():
    state = VGG16Features().state_dict()
    conv_indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert list(state) == [f"{i}.{p}" for i in conv_indices for p in ("weight", "bias")]
    assert state["0.weight"].shape == (64, 3, 3, 3)
    assert state["10.weight"].shape == (256, 128, 3, 3)
    assert state["28.weight"].shape == (512, 512, 3, 3)


def test_lpips_vgg_matches_torchmetrics_implementation(monkeypatch):
    """torchmetrics' LPIPS code, given our VGG16 where it would ask torchvision for one, agrees."""
    from torchmetrics.functional.image import lpips as tm_lpips

    if not hasattr(tm_lpips, "_get_tv_model_features"):
        pytest.skip("this torchmetrics version builds LPIPS differently")
    torch.manual_seed(0)
    features = VGG16Features()
    monkeypatch.setattr(tm_lpips, "_get_tv_model_features", lambda net, pretrained=False: features)
    reference = tm_lpips._LPIPS(pretrained=True, net="vgg", pnet_rand=True).eval()  # its bundled lin weights
    ours = LPIPS(features=features)
    ours.load_lin_state_dict({k: v for k, v in reference.state_dict().items() if re.match(r"lin\d", k)})
    a = torch.from_numpy(smooth_images(8, n=2, height=64, width=64)).float() * 2 - 1
    b = torch.from_numpy(smooth_images(9, n=2, height=64, width=64)).float() * 2 - 1
    with torch.no_grad():
        expected = reference(a, b).flatten()
        value = ours.eval()(a, b)
    assert (expected > 1e-3).all()
    torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-6)


def test_lpips_from_pretrained_loads_torchvision_and_lpips_files(tmp_path, monkeypatch):
    torch.manual_seed(0)
    features = VGG16Features()
    checkpoint = {f"features.{k}": v for k, v in features.state_dict().items()}
    checkpoint["classifier.0.weight"] = torch.zeros(4, 2)  # a full vgg16() checkpoint also has the classifier
    torch.save(checkpoint, tmp_path / "vgg16-397923af.pth")
    lins = random_lin_state_dict((64, 128, 256, 512, 512), torch.Generator().manual_seed(2))
    torch.save(lins, tmp_path / "vgg.pth")

    expected_model = LPIPS(features=features)
    expected_model.load_lin_state_dict(lins)
    a = torch.from_numpy(smooth_images(10, n=2)).float() * 2 - 1
    b = torch.from_numpy(smooth_images(11, n=2)).float() * 2 - 1

    model = LPIPS.from_pretrained(vgg_path=tmp_path / "vgg16-397923af.pth", lin_path=tmp_path / "vgg.pth")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        expected = expected_model.eval()(a, b)
        torch.testing.assert_close(model(a, b), expected, rtol=0, atol=0)

    # the same files found through the environment variables
    monkeypatch.setenv("SODA_LPIPS_VGG", str(tmp_path / "vgg16-397923af.pth"))
    monkeypatch.setenv("SODA_LPIPS_LIN", str(tmp_path / "vgg.pth"))
    with torch.no_grad():
        torch.testing.assert_close(LPIPS.from_pretrained()(a, b), expected, rtol=0, atol=0)


def test_lpips_without_vgg_weights_says_which_file_and_where(no_weights_anywhere, tmp_path):
    with pytest.raises(MissingWeightsError, match="vgg16-397923af.pth") as error:
        LPIPS.from_pretrained()
    assert isinstance(error.value, FileNotFoundError)
    message = str(error.value)
    assert "\n" not in message and str(no_weights_anywhere) in message and "SODA_LPIPS_VGG" in message
    with pytest.raises(MissingWeightsError, match="nowhere.pth"):
        LPIPS.from_pretrained(vgg_path=tmp_path / "nowhere.pth")


# ------------------------------------------------------------------------------------ FID


def test_to_uint8_clips_and_rounds():
    images = torch.tensor([-0.2, 0.0, 0.3 / 255, 0.7 / 255, 100.5 / 255, 254.6 / 255, 1.0, 1.3])
    assert to_uint8(images).tolist() == [0, 0, 0, 1, 100, 255, 255, 255]  # floor would give 0, 254 for two


def test_resize_bilinear_tf1_samples_without_half_pixel_offset():
    image = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    expected = torch.tensor(
        [[0.0, 5.0, 10.0, 10.0], [10.0, 15.0, 20.0, 20.0], [20.0, 25.0, 30.0, 30.0], [20.0, 25.0, 30.0, 30.0]]
    )
    torch.testing.assert_close(resize_bilinear_tf1(image, 4)[0, 0], expected)


class PooledConvFeatures(nn.Module):
    """A small random extractor on uint8 images: conv, ReLU, global average pool."""

    num_features = 6

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, self.num_features, 3)

    def forward(self, images):
        assert images.dtype == torch.uint8, "fid_metric must hand extractors uint8 images"
        return torch.relu(self.conv(images.float() / 255)).mean(dim=(2, 3))


def test_fid_with_a_custom_extractor_and_reset():
    generator = torch.Generator().manual_seed(0)
    dark = 0.5 * torch.rand(64, 3, 16, 16, generator=generator)
    dark_too = 0.5 * torch.rand(64, 3, 16, 16, generator=generator)
    bright = 0.5 + 0.5 * torch.rand(64, 3, 16, 16, generator=generator)
    metric = fid_metric(PooledConvFeatures())

    different = fid(metric, dark, bright, batch_size=20)
    same_distribution = fid(metric, dark, dark_too)
    identical = fid(metric, dark, dark)
    assert abs(identical) < 1e-6 * different
    assert different > 1e-3 and different > 20 * same_distribution
    # reset between uses: without it the second call would pool dark+dark against bright+dark
    assert fid(metric, dark, bright) == pytest.approx(different, rel=1e-6)
    assert abs(fid(metric, dark, dark)) < 1e-6 * different
    # batches from an iterable, as an evaluation loop yields them
    assert fid(metric, dark.split(16), iter(bright.split(7))) == pytest.approx(different, rel=1e-5)


def test_fid_without_inception_weights_says_which_file_and_where(no_weights_anywhere):
    with pytest.raises(MissingWeightsError, match="weights-inception-2015-12-05-6726825d.pth") as error:
        fid_metric()
    assert str(no_weights_anywhere) in str(error.value) and "SODA_FID_INCEPTION" in str(error.value)


def test_fid_inception_loads_from_a_local_file(tmp_path, monkeypatch):
    torch.manual_seed(0)
    network = InceptionV3Features().eval()
    state = {k: v for k, v in network.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert state["fc.weight"].shape == (1008, 2048)  # the TF graph's 1008 classes
    torch.save(state, tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    monkeypatch.setenv("SODA_FID_INCEPTION", str(tmp_path / "weights-inception-2015-12-05-6726825d.pth"))

    metric = fid_metric()
    loaded = metric.inception.extractor.state_dict()
    assert loaded.keys() == network.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    image = to_uint8(torch.from_numpy(smooth_images(12, n=1, height=64, width=64)).float())
    with torch.no_grad():  # one image: a 299 px Inception pass takes seconds on two cores
        features = metric.inception(image)
    assert features.shape == (1, 2048) and torch.isfinite(features).all()

    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(RuntimeError, match="not an FID Inception checkpoint"):
        InceptionV3Features.from_pretrained(tmp_path / "other.pth")


# ------------------------------------------------------------------------------------ aggregation


def records():
    return [
        {
            "object_id": "a",
            "category": "chair",
            "psnr": [20.0, 22.0],
            "ssim": [0.8, 0.9],
            "lpips": [0.1, 0.3],
        },
        {
            "object_id": "b",
            "category": "chair",
            "psnr": torch.tensor([30.0, 30.0, 30.0]),
            "ssim": [0.9] * 3,
            "lpips": [0.1] * 3,
        },
        {"object_id": "c", "category": "car", "psnr": [25.0], "ssim": [0.7], "lpips": [0.4]},
    ]


def test_aggregate_averages_per_object_then_over_objects():
    result = aggregate(records())
    json.dumps(result)
    # per-object means 21, 30, 25 (a mean over all six views would give 26.17)
    assert result["psnr"] == pytest.approx((21 + 30 + 25) / 3)
    assert result["ssim"] == pytest.approx((0.85 + 0.9 + 0.7) / 3)
    assert result["lpips"] == pytest.approx((0.2 + 0.1 + 0.4) / 3)
    assert (result["num_objects"], result["num_views"]) == (3, 6)
    chair, car = result["per_category"]["chair"], result["per_category"]["car"]
    assert list(result["per_category"]) == ["car", "chair"]
    assert chair == pytest.approx(
        {"num_objects": 2, "num_views": 5, "psnr": 25.5, "ssim": 0.875, "lpips": 0.15}
    )
    assert car == pytest.approx({"num_objects": 1, "num_views": 1, "psnr": 25.0, "ssim": 0.7, "lpips": 0.4})


def test_aggregate_missing_lpips_and_bad_records():
    without_lpips = [dict(r, lpips=None) for r in records()]
    result = aggregate(without_lpips)
    assert result["lpips"] is None and result["per_category"]["car"]["lpips"] is None
    assert math.isclose(result["psnr"], (21 + 30 + 25) / 3)

    with pytest.raises(ValueError, match="lpips"):
        aggregate(records()[:2] + without_lpips[2:])
    with pytest.raises(ValueError, match="twice"):
        aggregate(records() + records()[:1])
    with pytest.raises(ValueError, match="ssim"):
        aggregate([dict(records()[0], ssim=[0.5])])


def test_colour_error_splits_into_brightness_and_chroma():
    target = canvas(8, 8, square=(slice(2, 6), slice(2, 6), (100, 100, 100))).expand(3, -1, -1, -1)
    darker = canvas(8, 8, square=(slice(2, 6), slice(2, 6), (40, 40, 40)))  # the same grey, less light
    tinted = canvas(8, 8, square=(slice(2, 6), slice(2, 6), (130, 100, 70)))  # the same brightness, warmer
    both = canvas(8, 8, square=(slice(2, 6), slice(2, 6), (90, 60, 30)))
    generated = torch.cat([darker, tinted, both])
    brightness, chroma = foreground_color_error_parts(generated, target)
    torch.testing.assert_close(brightness, torch.tensor([60 * math.sqrt(3), 0.0, 40 * math.sqrt(3)]), atol=1e-3, rtol=0)
    torch.testing.assert_close(chroma, torch.tensor([0.0, 30 * math.sqrt(2), 30 * math.sqrt(2)]), atol=1e-3, rtol=0)
    torch.testing.assert_close(brightness.hypot(chroma), foreground_color_error(generated, target), atol=1e-3, rtol=0)
