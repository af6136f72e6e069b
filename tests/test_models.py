import json

import pytest
import torch
from conftest import TINY_ENCODER, TINY_UNET, randomize_

from soda_diffusers import SODAEncoder, SODAUNet2DModel
from soda_diffusers.cameras import orbit_rays


def tiny_inputs(batch=2, size=16):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 3, size, size, generator=generator)
    rays = orbit_rays([15.0 * i for i in range(batch)], size=size)
    z = torch.randn(batch, TINY_UNET["latent_dim"], generator=generator)
    return sample, rays, z


@pytest.mark.parametrize(
    "model_class, config",
    [
        (SODAEncoder, TINY_ENCODER),
        (SODAEncoder, dict(TINY_ENCODER, pooling="flatten", latent_norm="batch")),
        (SODAEncoder, dict(TINY_ENCODER, pooling="flatten", patch_size=2, background_value=1.0, thumbnail_size=4)),
        (SODAEncoder, dict(TINY_ENCODER, backbone="resnet", resnet_layer_type="basic", resnet_depths=(1, 1),
                           resnet_hidden_sizes=(8, 16), resnet_embedding_size=8, pooling="flatten")),
        (SODAUNet2DModel, TINY_UNET),
        (SODAUNet2DModel, dict(TINY_UNET, cross_attention_resolutions=(16, 4), latent_tokens=3)),
    ],
)
def test_save_and_load_round_trip_config_and_weights(tmp_path, model_class, config):
    model = randomize_(model_class(**config)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = model_class.from_pretrained(tmp_path).eval()
    def public(config):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if not k.startswith("_")}

    assert public(loaded.config) == public(model.config)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)


def test_every_constructor_argument_is_registered():
    import inspect

    for model_class in (SODAEncoder, SODAUNet2DModel):
        arguments = set(inspect.signature(model_class.__init__).parameters) - {"self"}
        assert arguments <= set(model_class(**({"latent_dim": 12} if model_class is SODAUNet2DModel else {})).config)


def test_unet_accepts_integer_float_and_per_sample_timesteps():
    unet = randomize_(SODAUNet2DModel(**TINY_UNET)).eval()
    sample, rays, z = tiny_inputs()
    with torch.no_grad():
        a = unet(sample, 500, rays, z).sample
        b = unet(sample, torch.tensor([500.0, 500.0]), rays, z).sample
        c = unet(sample, torch.tensor(499.5), rays, z).sample
    assert a.shape == sample.shape
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_unet_output_depends_on_z_and_rays():
    unet = randomize_(SODAUNet2DModel(**TINY_UNET)).eval()
    sample, rays, z = tiny_inputs()
    with torch.no_grad():
        base = unet(sample, 10, rays, z).sample
        assert not torch.allclose(base, unet(sample, 10, rays, z + 1).sample)
        assert not torch.allclose(base, unet(sample, 10, rays.flip(0), z).sample)


def test_layerwise_modulation_routes_chunks_to_levels():
    unet = randomize_(SODAUNet2DModel(**TINY_UNET))
    chunks = unet.z_chunks(torch.arange(12.0)[None])
    # Two levels: chunk 0 and 1 for the levels and their mirrors, chunk 2 for the middle.
    assert [c.tolist()[0] for c in chunks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    for level in unet.down_levels:
        assert level.blocks[0].resnet.z_proj.in_features == 4
    # Changing the middle chunk changes the output; down level 0's projection ignores it.
    sample, rays, z = tiny_inputs()
    unet.eval()
    with torch.no_grad():
        base = unet(sample, 10, rays, z).sample
        z_mid = z.clone()
        z_mid[:, 8:] += 1
        assert not torch.allclose(base, unet(sample, 10, rays, z_mid).sample)


def test_train_mode_samples_as_eval_mode_and_configs_with_the_old_dropout_keys_still_load(tmp_path):
    # The dropout of z lives in the training script now; a config saved with it (z_drop_prob, layer_mask_prob)
    # loads, the keys ignored, and the model gives what it gave.
    unet = randomize_(SODAUNet2DModel(**TINY_UNET))
    sample, rays, latent = tiny_inputs()
    with torch.no_grad():
        expected = unet.eval()(sample, 3, rays, latent).sample
        torch.testing.assert_close(unet.train()(sample, 3, rays, latent).sample, expected)
    unet.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "z_drop_prob" not in config and "layer_mask_prob" not in config
    (tmp_path / "config.json").write_text(json.dumps(dict(config, z_drop_prob=0.1, layer_mask_prob=0.2)))
    loaded = SODAUNet2DModel.from_pretrained(tmp_path).eval()
    assert "z_drop_prob" not in loaded.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(sample, 3, rays, latent).sample, expected)


def test_attention_processors_are_exposed_and_swappable():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = randomize_(SODAUNet2DModel(**dict(TINY_UNET, cross_attention_resolutions=(16,), latent_tokens=3))).eval()
    processors = unet.attn_processors
    # One self-attention layer per block at 8 px (down, middle, up) and one cross-attention per block at 16 px.
    assert len(processors) > 2 and all(name.endswith(".processor") for name in processors)
    assert all(isinstance(p, AttnProcessor2_0) for p in processors.values())
    sample, rays, latent = tiny_inputs()
    with torch.no_grad():
        expected = unet(sample, 3, rays, latent).sample
        unet.set_attn_processor(AttnProcessor())
        assert all(isinstance(p, AttnProcessor) for p in unet.attn_processors.values())
        torch.testing.assert_close(unet(sample, 3, rays, latent).sample, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="number of attention layers"):
        unet.set_attn_processor({"one.processor": AttnProcessor()})


def test_gradient_checkpointing_gives_the_same_gradients():
    sample, rays, z = tiny_inputs()
    grads = []
    for checkpointing in (False, True):
        unet = randomize_(SODAUNet2DModel(**TINY_UNET))
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet(sample, 7, rays, z).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_cross_attention_starts_as_the_identity_and_reads_each_latent_token():
    config = dict(TINY_UNET, layerwise_modulation=False, cross_attention_resolutions=(16, 8, 4), latent_tokens=4)
    unet = SODAUNet2DModel(**config)
    plain = SODAUNet2DModel(**dict(config, cross_attention_resolutions=()))
    randomize_(plain)
    # The shared weights copied over; the cross-attention layers keep their zero-initialised outputs.
    missing, unexpected = unet.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("cross_attention" in k or "latent_token" in k for k in missing)
    # 16 px, no patches: levels at 16 and 8 px (one block down, two up, each) and the first middle block.
    assert sum(1 for name, _ in unet.named_modules() if name.endswith("cross_attention")) == 2 * (1 + 2) + 1
    sample, rays, z = tiny_inputs()
    unet.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(unet(sample, 10, rays, z).sample, plain(sample, 10, rays, z).sample)
        randomize_(unet, seed=5)
        base = unet(sample, 10, rays, z).sample
        for token in range(4):  # every token reaches the output
            changed = z.clone()
            changed[:, 3 * token : 3 * token + 3] += 1
            assert not torch.allclose(base, unet(sample, 10, rays, changed).sample), token
    with pytest.raises(ValueError, match="latent_tokens: expected a divisor of latent_dim"):
        SODAUNet2DModel(**dict(config, latent_tokens=5))


def test_encoder_fuses_several_views_and_needs_their_rays():
    encoder = randomize_(SODAEncoder(**TINY_ENCODER)).eval()
    views = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    rays = orbit_rays([0.0, 30.0, 60.0], size=16)[None].expand(2, -1, -1, -1, -1)
    with torch.no_grad():
        fused = encoder(views, rays)
        singles = torch.stack([encoder(views[:, i], rays[:, i]) for i in range(3)]).mean(0)
        assert fused.shape == (2, 12)
        torch.testing.assert_close(fused, singles)
        # One view without rays: the canonical rays of a camera at the origin are used.
        torch.testing.assert_close(encoder(views[:, 0]), encoder(views[:, 0], rays[:, 0]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="source_rays"):
        encoder(views)


def test_the_stem_sees_the_white_background_as_zero_with_background_value_1():
    seen = []
    for background_value in (0.0, 1.0):
        encoder = randomize_(SODAEncoder(**dict(TINY_ENCODER, background_value=background_value))).eval()
        encoder.conv_in.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0][:, :3]))
        white = torch.ones(1, 3, 16, 16)
        white[..., 6:10, 6:10] = torch.tensor([0.2, -0.5, 0.9])[:, None, None]  # a coloured object
        with torch.no_grad():
            encoder(white)
    torch.testing.assert_close(seen[1], seen[0] - 1)
    assert (seen[1][..., :6, :] == 0).all() and (seen[1][..., 6:10, 6:10] != 0).all()
    # Patches of the same image feed a stem of patch_size**2 times the channels.
    encoder = SODAEncoder(**dict(TINY_ENCODER, patch_size=2, background_value=1.0)).eval()
    assert encoder.conv_in.in_channels == 4 * SODAEncoder(**TINY_ENCODER).conv_in.in_channels
    assert encoder(white).shape == (1, TINY_ENCODER["latent_dim"])


def test_the_thumbnail_path_carries_the_mean_colours_of_the_source_into_z():
    encoder = SODAEncoder(**dict(TINY_ENCODER, thumbnail_size=2, background_value=1.0)).eval()
    with torch.no_grad():
        encoder.proj_out.weight.zero_()  # only the thumbnail path left
        encoder.proj_out.bias.zero_()
        views = torch.ones(2, 3, 16, 16)
        views[0, :, :8, :8] = torch.tensor([0.5, -0.5, 0.0])[:, None, None]
        views[1, :, :8, :8] = torch.tensor([-0.5, 0.0, 0.5])[:, None, None]  # the same object, its channels turned
        thumbnails = torch.nn.functional.adaptive_avg_pool2d(views - 1, 2).flatten(1)
        torch.testing.assert_close(encoder(views), encoder.thumbnail_proj(thumbnails))
        assert not torch.allclose(encoder(views)[0], encoder(views)[1])


def test_flatten_pooling_sees_where_the_object_is():
    # The same small blob at two places: global average pooling can hardly tell them apart (only the
    # convolutions' borders differ), flattening keeps where it is.
    left, right = torch.ones(1, 3, 16, 16), torch.ones(1, 3, 16, 16)
    left[..., 2:6, 2:6], right[..., 10:14, 10:14] = -1, -1
    views = torch.cat([left, right])
    latents = {}
    for pooling in ("mean", "flatten"):
        encoder = randomize_(SODAEncoder(**TINY_ENCODER, pooling=pooling, use_source_rays=False)).eval()
        with torch.no_grad():
            latents[pooling] = encoder(views)
    def spread(z):
        return ((z[0] - z[1]).norm() / z.norm(dim=1).mean()).item()

    assert spread(latents["flatten"]) > 3 * spread(latents["mean"])
    with pytest.raises(ValueError, match="pooling"):
        SODAEncoder(**TINY_ENCODER, pooling="max")


def test_batch_latent_norm_standardises_each_latent_dimension():
    encoder = randomize_(SODAEncoder(**TINY_ENCODER, latent_norm="batch")).train()
    views = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    raw = []
    encoder.proj_out.register_forward_hook(lambda module, inputs, output: raw.append(output))
    z = encoder(views)
    mean, var = raw[0].mean(dim=0), raw[0].var(dim=0, unbiased=False)
    torch.testing.assert_close(z, (raw[0] - mean) / (var + encoder.latent_batch_norm.eps).sqrt())
    torch.testing.assert_close(z.mean(dim=0), torch.zeros(z.shape[1]), atol=1e-5, rtol=0)
    # In eval mode a batch norm uses its running statistics: one view alone gets the same latent.
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(views[:1]), encoder(views)[:1])
    with pytest.raises(ValueError, match="latent_norm"):
        SODAEncoder(**TINY_ENCODER, latent_norm="group")


def test_gradients_reach_the_encoder_through_z():
    encoder = randomize_(SODAEncoder(**TINY_ENCODER))
    unet = randomize_(SODAUNet2DModel(**TINY_UNET))
    sample, rays, _ = tiny_inputs()
    source = torch.rand(2, 3, 16, 16) * 2 - 1
    unet(sample, 100, rays, encoder(source)).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda u, s, r, z: u(s[:, :2], 1, r, z), "sample"),
        (lambda u, s, r, z: u(s, 1, r[:, :5], z), "target_rays"),
        (lambda u, s, r, z: u(s, 1, r[:1], z), "target_rays"),
        (lambda u, s, r, z: u(s, 1, r, z[:, :5]), "z"),
    ],
)
def test_unet_rejects_bad_shapes_naming_the_argument(call, match):
    unet = SODAUNet2DModel(**TINY_UNET)
    sample, rays, z = tiny_inputs()
    with pytest.raises(ValueError, match=match):
        call(unet, sample, rays, z)


def test_encoder_rejects_bad_shapes_naming_the_argument():
    encoder = SODAEncoder(**TINY_ENCODER)
    with pytest.raises(ValueError, match="source_image.*3"):
        encoder(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="16x16"):
        encoder(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="sample_size"):
        SODAUNet2DModel(sample_size=20, block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
