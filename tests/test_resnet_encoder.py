"""SODAEncoder(backbone="resnet"): transformers' ResNetModel, from scratch, behind the same ray channels and head."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_ENCODER, TINY_SIZE, make_tiny_pipeline, randomize_

from soda_diffusers import SODAEncoder, SODANovelViewPipeline, orbit_rays

TINY_RESNET = dict(
    backbone="resnet", resnet_layer_type="basic", resnet_depths=(1, 1), resnet_hidden_sizes=(8, 16),
    resnet_embedding_size=8,
)
RESNET_KEYS = {"backbone", "resnet_layer_type", "resnet_depths", "resnet_hidden_sizes", "resnet_embedding_size",
               "resnet_stem"}


def tiny_resnet_encoder(**overrides) -> SODAEncoder:
    torch.manual_seed(0)
    return SODAEncoder(**{**TINY_ENCODER, **TINY_RESNET, **overrides})


def sources(batch=3, views=None, seed=0):
    shape = (batch, 3, TINY_SIZE, TINY_SIZE) if views is None else (batch, views, 3, TINY_SIZE, TINY_SIZE)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("overrides, final_size", [
    ({}, 8),
    (dict(pooling="flatten", latent_norm="batch", thumbnail_size=4), 8),
    (dict(resnet_layer_type="bottleneck", resnet_hidden_sizes=(16, 32), patch_size=2, pooling="flatten"), 4),
    (dict(resnet_stem="imagenet", pooling="flatten"), 2),
])
def test_forward_shape_and_head(overrides, final_size):
    encoder = tiny_resnet_encoder(**overrides).eval()
    assert type(encoder.resnet.model).__name__ == "ResNetModel"
    assert not hasattr(encoder, "conv_in") and not hasattr(encoder, "norm_out")
    channels = encoder.config.resnet_hidden_sizes[-1]
    expected_in = channels * (final_size**2 if encoder.config.pooling == "flatten" else 1)
    assert encoder.proj_out.in_features == expected_in
    side = TINY_SIZE // encoder.config.patch_size
    with torch.no_grad():
        z = encoder(sources())
        features = encoder.resnet(torch.zeros(1, encoder.resnet.model.config.num_channels, side, side))
        multi = encoder(sources(2, views=2), orbit_rays([0.0, 40.0] * 2, size=TINY_SIZE).view(2, 2, 6, TINY_SIZE, TINY_SIZE))
    assert z.shape == (3, 12) and multi.shape == (2, 12) and torch.isfinite(z).all()
    assert features.shape[1:] == (channels, final_size, final_size)


def test_same_input_channels_as_the_conv_backbone():
    conv, resnet = SODAEncoder(**TINY_ENCODER), tiny_resnet_encoder()
    assert resnet.resnet.model.config.num_channels == conv.conv_in.in_channels  # image and ray channels
    no_rays = tiny_resnet_encoder(use_source_rays=False, patch_size=2)
    assert no_rays.resnet.model.config.num_channels == 3 * 4


def test_backbone_is_resnet_models_last_hidden_state():
    encoder = randomize_(tiny_resnet_encoder()).eval()
    x = torch.randn(2, encoder.resnet.model.config.num_channels, TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(encoder.resnet(x), encoder.resnet.model(x).last_hidden_state)


def test_gradient_reaches_every_parameter_and_checkpointing_matches():
    def gradients(checkpointing):
        encoder = tiny_resnet_encoder(thumbnail_size=2)
        if checkpointing:
            encoder.enable_gradient_checkpointing()
            assert encoder.resnet.gradient_checkpointing
        weights = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
        (encoder(sources()) * weights).sum().backward()
        return {name: p.grad for name, p in encoder.named_parameters()}

    plain = gradients(False)
    assert all(g is not None and g.abs().sum() > 0 for g in plain.values()), [n for n, g in plain.items() if g is None]
    assert any(name.startswith("resnet.model.embedder") for name in plain)
    for name, g in gradients(True).items():
        torch.testing.assert_close(g, plain[name], msg=name)


def test_save_and_load_round_trip_gives_identical_z(tmp_path):
    encoder = randomize_(tiny_resnet_encoder(pooling="flatten", latent_norm="batch"))
    encoder.train()
    with torch.no_grad():
        encoder(sources(8, seed=3))  # BatchNorm running statistics away from their initial values
    encoder.eval()
    with torch.no_grad():
        z = encoder(sources())
    encoder.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert RESNET_KEYS <= set(config) and config["backbone"] == "resnet" and config["resnet_depths"] == [1, 1]
    loaded = SODAEncoder.from_pretrained(tmp_path).eval()
    def registered(model):  # tuples come back from JSON as lists
        return {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items() if k in RESNET_KEYS}

    assert registered(loaded) == registered(encoder)
    assert loaded.state_dict().keys() == encoder.state_dict().keys()
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, msg=name, rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(loaded(sources()), z)


def test_default_backbone_is_unchanged_and_registered():
    encoder = SODAEncoder(**TINY_ENCODER)
    assert encoder.config.backbone == "conv" and RESNET_KEYS <= set(encoder.config)
    assert not hasattr(encoder, "resnet") and not any(n.startswith("resnet.") for n in encoder.state_dict())


@pytest.mark.parametrize("overrides, match", [
    (dict(backbone="vit"), "backbone"),
    (dict(resnet_layer_type="wide"), "resnet_layer_type"),
    (dict(resnet_stem="deep"), "resnet_stem"),
    (dict(resnet_depths=(1, 1, 1)), "resnet_depths"),
    (dict(resnet_stem="imagenet", resnet_depths=(1,) * 4, resnet_hidden_sizes=(8,) * 4), "sample_size"),
])
def test_invalid_resnet_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_resnet_encoder(**overrides)


def test_missing_transformers_is_a_clear_error(monkeypatch):
    SODAEncoder(**TINY_ENCODER)  # the default backbone never needs it
    monkeypatch.setitem(sys.modules, "transformers.models.resnet.modeling_resnet", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        tiny_resnet_encoder()


def test_pipeline_with_resnet_encoder_generates():
    pipe = make_tiny_pipeline(**TINY_RESNET)
    assert pipe.encoder.config.backbone == "resnet"
    rays = orbit_rays([15.0, 30.0], size=TINY_SIZE)
    source = torch.rand(3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images = pipe(source, rays, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    assert images.shape == (2, 3, TINY_SIZE, TINY_SIZE) and torch.isfinite(images).all()


def test_from_preset_and_training_flag_build_a_resnet_encoder():
    pipe = SODANovelViewPipeline.from_preset("soda-tiny", encoder=TINY_RESNET)
    assert pipe.encoder.config.backbone == "resnet" and not pipe.encoder.training
    script = Path(__file__).resolve().parents[1] / "training" / "train_soda.py"
    spec = importlib.util.spec_from_file_location("train_soda_resnet_under_test", script)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    encoder_flag = json.dumps({**TINY_RESNET, "resnet_depths": [1, 1], "resnet_hidden_sizes": [8, 16]})
    pipe = train.build_pipeline(train.parse_args(["--preset", "soda-tiny", "--encoder", encoder_flag]))
    assert pipe.encoder.config.backbone == "resnet" and pipe.encoder.config.resnet_hidden_sizes == [8, 16]
    size = pipe.encoder.config.sample_size
    with torch.no_grad():
        assert pipe.encoder(torch.zeros(2, 3, size, size)).shape == (2, pipe.encoder.config.latent_dim)
