import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import make_tiny_pipeline
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from soda_diffusers import SODAEncoder, SODANovelViewPipeline, SODAUNet2DModel, orbit_rays

SIZE = 16


def source_tensor(seed=0):
    return torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def run(pipe, source, rays, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "pt")
    return pipe(source, rays, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_output_types(tiny_pipeline):
    rays = orbit_rays([15.0, 30.0], size=SIZE)
    pt = run(tiny_pipeline, source_tensor(), rays)
    np_images = run(tiny_pipeline, source_tensor(), rays, output_type="np")
    pil = run(tiny_pipeline, source_tensor(), rays, output_type="pil")
    assert pt.shape == (2, 3, SIZE, SIZE) and 0 <= pt.min() and pt.max() <= 1
    assert np_images.shape == (2, SIZE, SIZE, 3)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (SIZE, SIZE)
    images, = tiny_pipeline(source_tensor(), rays, num_inference_steps=2, output_type="np", return_dict=False)
    assert images.shape == (2, SIZE, SIZE, 3)


def test_same_generator_same_images_and_batch_equals_single_calls(tiny_pipeline):
    rays = orbit_rays([15.0, 30.0], size=SIZE)
    first = run(tiny_pipeline, source_tensor(), rays)
    torch.testing.assert_close(first, run(tiny_pipeline, source_tensor(), rays))
    generators = [torch.Generator().manual_seed(s) for s in (7, 8)]
    batch = tiny_pipeline(source_tensor(), rays, num_inference_steps=4, generator=generators, output_type="pt").images
    singles = [run(tiny_pipeline, source_tensor(), rays[i : i + 1], seed=s) for i, s in enumerate((7, 8))]
    torch.testing.assert_close(batch, torch.cat(singles), atol=1e-4, rtol=0)


def test_one_source_per_target_equals_separate_calls(tiny_pipeline):
    rays = orbit_rays([15.0, 30.0], size=SIZE)
    sources = torch.stack([source_tensor(1), source_tensor(2)])
    generators = [torch.Generator().manual_seed(s) for s in (7, 8)]
    paired = tiny_pipeline(sources, rays, num_inference_steps=3, generator=generators, output_type="pt").images
    for i, seed in enumerate((7, 8)):
        single = run(tiny_pipeline, sources[i], rays[i : i + 1], seed=seed, num_inference_steps=3)
        torch.testing.assert_close(paired[i : i + 1], single, atol=1e-4, rtol=0)


def test_guidance_scale_one_is_the_conditional_model(tiny_pipeline):
    rays = orbit_rays([45.0], size=SIZE)
    pipe = tiny_pipeline
    calls = []
    original_forward = pipe.unet.forward

    def spy(sample, timestep, target_rays, z, return_dict=True):
        calls.append(z.clone())
        return original_forward(sample, timestep, target_rays, z, return_dict)

    pipe.unet.forward = spy
    guided_one = run(pipe, source_tensor(), rays, guidance_scale=1.0, num_inference_steps=2)
    assert all(c.shape[0] == 1 and c.abs().sum() > 0 for c in calls)
    calls.clear()
    guided = run(pipe, source_tensor(), rays, guidance_scale=3.0, num_inference_steps=2)
    # Guidance runs the unconditional (z dropped) and the conditional branch in one batch, in Diffusers' order.
    assert all(c.shape[0] == 2 and c[0].abs().sum() == 0 and c[1].abs().sum() > 0 for c in calls)
    assert not torch.allclose(guided_one, guided)


def test_guidance_combines_the_two_branches_linearly(tiny_pipeline):
    rays = orbit_rays([45.0], size=SIZE)
    pipe = tiny_pipeline
    unet = pipe.unet
    noise = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    z = pipe.encode(source_tensor())
    with torch.no_grad():
        conditional = unet(noise, 999, rays, z).sample
        unconditional = unet(noise, 999, rays, torch.zeros_like(z)).sample
    seen = {}
    original_step = pipe.scheduler.step

    def spy(model_output, timestep, sample, **kwargs):
        seen.setdefault("output", model_output.clone())
        return original_step(model_output, timestep, sample, **kwargs)

    pipe.scheduler.step = spy
    pipe(source_tensor(), rays, num_inference_steps=1, guidance_scale=2.5, latents=noise, output_type="pt")
    torch.testing.assert_close(seen["output"], unconditional + 2.5 * (conditional - unconditional), atol=1e-4, rtol=0)


def test_several_images_per_target_come_consecutively_and_each_is_its_own_call(tiny_pipeline):
    rays = orbit_rays([15.0, 30.0], size=SIZE)
    seeds = [[3, 4, 5], [6, 7, 8]]
    generators = [torch.Generator().manual_seed(seed) for per_target in seeds for seed in per_target]
    images = tiny_pipeline(source_tensor(), rays, num_inference_steps=3, num_images_per_target=3, generator=generators,
                           output_type="pt").images
    assert images.shape == (6, 3, SIZE, SIZE)
    for target, per_target in enumerate(seeds):
        for k, seed in enumerate(per_target):
            single = run(tiny_pipeline, source_tensor(), rays[target : target + 1], seed=seed, num_inference_steps=3)
            torch.testing.assert_close(images[3 * target + k : 3 * target + k + 1], single, atol=1e-4, rtol=0)
    assert run(tiny_pipeline, source_tensor(), rays, num_images_per_target=2, guidance_scale=2.0).shape[0] == 4
    with pytest.raises(ValueError, match=r"one generator per image \(2 targets x 3 = 6\), got 2"):
        tiny_pipeline(source_tensor(), rays, num_images_per_target=3, generator=generators[:2])
    with pytest.raises(ValueError, match="num_images_per_target: expected a positive integer"):
        tiny_pipeline(source_tensor(), rays, num_images_per_target=0)


def test_custom_timesteps_replace_the_scheduler_spacing(tiny_pipeline):
    rays = orbit_rays([15.0], size=SIZE)
    tiny_pipeline.scheduler = DDPMScheduler.from_config(tiny_pipeline.scheduler.config)
    tiny_pipeline.scheduler.set_timesteps(4)
    spaced = tiny_pipeline.scheduler.timesteps.tolist()
    torch.testing.assert_close(run(tiny_pipeline, source_tensor(), rays, timesteps=spaced),
                               run(tiny_pipeline, source_tensor(), rays, num_inference_steps=4))
    custom = run(tiny_pipeline, source_tensor(), rays, timesteps=[999, 900, 500, 100, 0])
    assert tiny_pipeline.num_timesteps == 5 and tiny_pipeline.scheduler.timesteps.tolist() == [999, 900, 500, 100, 0]
    assert not torch.allclose(custom, run(tiny_pipeline, source_tensor(), rays, num_inference_steps=4))
    tiny_pipeline.scheduler = DDIMScheduler.from_config(tiny_pipeline.scheduler.config)
    with pytest.raises(ValueError, match="DDIMScheduler does not take a custom timestep schedule"):
        run(tiny_pipeline, source_tensor(), rays, timesteps=[999, 0])


def test_callback_on_step_end_sees_and_replaces_tensors_and_can_interrupt(tiny_pipeline):
    rays = orbit_rays([15.0, 30.0], size=SIZE)
    seen = []

    def record(pipe, i, t, tensors):
        seen.append((i, int(t), sorted(tensors), tensors["z"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == pipe.num_timesteps - 1 else {}

    images = run(tiny_pipeline, source_tensor(), rays, callback_on_step_end=record,
                 callback_on_step_end_tensor_inputs=["latents", "z"])
    assert [row[0] for row in seen] == [0, 1, 2, 3] and [row[1] for row in seen] == tiny_pipeline.scheduler.timesteps.tolist()
    assert all(row[2] == ["latents", "z"] and row[3] == (2, 12) for row in seen)
    torch.testing.assert_close(images, torch.full_like(images, 0.5))  # zero latents are mid-grey

    steps = []

    def stop_after_two(pipe, i, t, tensors):
        steps.append(i)
        pipe._interrupt = i == 1
        return {}

    interrupted = run(tiny_pipeline, source_tensor(), rays, callback_on_step_end=stop_after_two)
    assert steps == [0, 1] and not torch.allclose(interrupted, run(tiny_pipeline, source_tensor(), rays))
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs: expected names from \['latents', 'z'\]"):
        run(tiny_pipeline, source_tensor(), rays, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"])


def test_inputs_are_checked_before_any_work_and_latents_are_prepared_in_one_place(tiny_pipeline):
    rays = orbit_rays([15.0], size=SIZE)
    for kwargs, match in ((dict(output_type="latent"), "output_type"), (dict(num_inference_steps=0), "num_inference_steps"),
                          (dict(latents=torch.zeros(2, 3, SIZE, SIZE)), r"latents: expected \(1, 3, 16, 16\)")):
        with pytest.raises(ValueError, match=match):
            tiny_pipeline(source_tensor(), rays, **kwargs)
    noise = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tiny_pipeline.prepare_latents(1, torch.float32, torch.device("cpu"), None, noise),
                               noise * tiny_pipeline.scheduler.init_noise_sigma)
    drawn = tiny_pipeline.prepare_latents(2, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert drawn.shape == (2, 3, SIZE, SIZE)


def test_the_image_processor_prepares_sources_and_formats_outputs(tiny_pipeline):
    from diffusers.image_processor import VaeImageProcessor

    from soda_diffusers.pipeline_soda_novel_view import SODAImageProcessor

    processor = tiny_pipeline.image_processor
    assert isinstance(processor, SODAImageProcessor) and isinstance(processor, VaeImageProcessor)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 32, 3), dtype=np.uint8))
    prepared = processor.preprocess(image, SIZE)
    assert prepared.shape == (1, 1, 3, SIZE, SIZE)
    torch.testing.assert_close(tiny_pipeline.preprocess_source(image), prepared)
    assert processor.postprocess(torch.zeros(1, 3, SIZE, SIZE), output_type="np")[0, 0, 0].tolist() == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    "scheduler_class",
    [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, UniPCMultistepScheduler],
    ids=lambda c: c.__name__,
)
def test_each_scheduler_runs(tiny_pipeline, scheduler_class):
    tiny_pipeline.scheduler = scheduler_class.from_config(tiny_pipeline.scheduler.config)
    images = run(tiny_pipeline, source_tensor(), orbit_rays([15.0], size=SIZE), num_inference_steps=3)
    assert images.shape == (1, 3, SIZE, SIZE) and torch.isfinite(images).all()


def test_use_clipped_model_output_reaches_ddim_and_is_ignored_by_samplers_without_it(tiny_pipeline):
    rays = orbit_rays([15.0], size=SIZE)
    # A clip range small enough that the clean-image estimate is clipped at every step.
    tiny_pipeline.scheduler = DDIMScheduler.from_config({**tiny_pipeline.scheduler.config, "clip_sample": True,
                                                         "clip_sample_range": 0.05})
    unclipped_noise = run(tiny_pipeline, source_tensor(), rays)
    clipped_noise = run(tiny_pipeline, source_tensor(), rays, use_clipped_model_output=True)
    assert not torch.allclose(unclipped_noise, clipped_noise)
    torch.testing.assert_close(run(tiny_pipeline, source_tensor(), rays, use_clipped_model_output=False), unclipped_noise)
    tiny_pipeline.scheduler = DPMSolverMultistepScheduler.from_config(tiny_pipeline.scheduler.config)
    assert torch.isfinite(run(tiny_pipeline, source_tensor(), rays, use_clipped_model_output=True)).all()


@pytest.mark.parametrize("prediction_type, schedule", [("epsilon", "inverted_cosine"), ("v_prediction", "cosine"),
                                                       ("sample", "cosine")])
def test_save_pretrained_round_trip_reproduces_outputs(tmp_path, prediction_type, schedule):
    pipe = make_tiny_pipeline(prediction_type, schedule)
    rays = orbit_rays([15.0, 60.0], size=SIZE)
    expected = run(pipe, source_tensor(), rays)
    pipe.save_pretrained(tmp_path)
    loaded = SODANovelViewPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.prediction_type == prediction_type
    assert loaded.name_or_path == str(tmp_path)
    torch.testing.assert_close(run(loaded, source_tensor(), rays), expected, atol=0, rtol=0)


def test_a_folder_saved_when_each_model_had_its_module_still_loads(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["encoder"] == ["soda_diffusers.models.modeling_soda", "SODAEncoder"]
    index["encoder"][0], index["unet"][0] = "soda_diffusers.models.soda_encoder", "soda_diffusers.models.soda_unet_2d"
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = SODANovelViewPipeline.from_pretrained(tmp_path)
    assert type(loaded.encoder) is SODAEncoder and type(loaded.unet) is SODAUNet2DModel
    # The package itself as the module (its names are imported on first use).
    index["encoder"][0] = index["unet"][0] = "soda_diffusers"
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = SODANovelViewPipeline.from_pretrained(tmp_path)
    assert type(loaded.encoder) is SODAEncoder and type(loaded.unet) is SODAUNet2DModel


def test_source_image_formats_are_equivalent(tiny_pipeline):
    rays = orbit_rays([30.0], size=SIZE)
    array = (np.random.default_rng(0).random((SIZE * 2, SIZE * 2, 3)) * 255).astype(np.uint8)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1
    from_tensor = run(tiny_pipeline, tensor, rays)
    # Any size is resized to the encoder's resolution; PIL, uint8 and float arrays agree.
    torch.testing.assert_close(run(tiny_pipeline, array, rays), from_tensor, atol=1e-4, rtol=0)
    torch.testing.assert_close(run(tiny_pipeline, array / 255.0, rays), from_tensor, atol=1e-4, rtol=0)
    from_pil = run(tiny_pipeline, PIL.Image.fromarray(array).convert("RGBA"), rays)
    assert from_pil.shape == from_tensor.shape and (from_pil - from_tensor).abs().mean() < 0.05


def test_several_source_views_are_fused(tiny_pipeline):
    views = [source_tensor(1), source_tensor(2)]
    source_rays = orbit_rays([0.0, 90.0], size=SIZE)
    z_two = tiny_pipeline.encode(views, source_rays=source_rays)
    z_each = [tiny_pipeline.encode(v, source_rays=source_rays[i : i + 1]) for i, v in enumerate(views)]
    torch.testing.assert_close(z_two, (z_each[0] + z_each[1]) / 2, atol=1e-4, rtol=0)
    images = run(tiny_pipeline, views, orbit_rays([45.0], size=SIZE), source_rays=source_rays)
    assert images.shape == (1, 3, SIZE, SIZE)


@pytest.mark.parametrize(
    "source, rays, match",
    [
        (torch.zeros(4, SIZE, SIZE), orbit_rays([1.0], size=SIZE), "source_image.*3"),
        (np.zeros((SIZE, SIZE, 2)), orbit_rays([1.0], size=SIZE), "source_image"),
        (torch.full((3, SIZE, SIZE), 5.0), orbit_rays([1.0], size=SIZE), r"\[-1, 1\]"),
        ("image.png", orbit_rays([1.0], size=SIZE), "source_image"),
        (torch.zeros(3, 3, SIZE, SIZE), orbit_rays([1.0, 2.0], size=SIZE), "one per target"),
        (torch.zeros(3, SIZE, SIZE), orbit_rays([1.0], size=SIZE)[:, :5], "target_rays.*6"),
        (torch.zeros(3, SIZE, SIZE), orbit_rays([1.0], size=32), "target_rays"),
        (torch.zeros(3, SIZE, SIZE), orbit_rays([1.0], size=SIZE) * float("nan"), "target_rays.*NaN"),
    ],
)
def test_bad_input_gets_a_value_error_naming_the_argument(tiny_pipeline, source, rays, match):
    with pytest.raises(ValueError, match=match):
        tiny_pipeline(source, rays, num_inference_steps=1)


def test_generator_list_must_match_targets(tiny_pipeline):
    with pytest.raises(ValueError, match="generator"):
        tiny_pipeline(source_tensor(), orbit_rays([1.0, 2.0], size=SIZE), generator=[torch.Generator()])


def test_presets_build_and_unknown_presets_are_rejected():
    pipe = SODANovelViewPipeline.from_preset("soda-tiny")
    assert pipe.unet.config.sample_size == pipe.encoder.config.sample_size == 32
    assert pipe.unet.config.latent_dim == pipe.encoder.config.latent_dim
    assert isinstance(pipe.scheduler, DDIMScheduler)
    for name in ("soda-nmr-32", "soda-nmr-64"):
        config = SODANovelViewPipeline.from_preset(name).unet.config
        assert config.layerwise_modulation and config.attention_resolutions
    overridden = SODANovelViewPipeline.from_preset("soda-tiny", unet={"layers_per_block": 2})
    assert overridden.unet.config.layers_per_block == 2
    with pytest.raises(ValueError, match="soda-tiny"):
        SODANovelViewPipeline.from_preset("soda-huge")


def test_transparent_pixels_are_white_not_the_colour_they_hide(tiny_pipeline):
    # NMR renders sit on white; a cut-out with black under its transparent pixels must not turn black.
    rgba = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    rgba[4:12, 4:12] = (200, 30, 30, 255)  # an opaque red square on transparent black
    for source in (PIL.Image.fromarray(rgba, "RGBA"), rgba):
        image = tiny_pipeline.preprocess_source(source)[0, 0]
        torch.testing.assert_close(image[:, 0, 0], torch.ones(3))
        torch.testing.assert_close(image[:, 8, 8], torch.tensor([200, 30, 30]) / 127.5 - 1)
    half = rgba.copy()
    half[..., 3] = np.where(half[..., 3] == 0, 128, 255)
    corner = tiny_pipeline.preprocess_source(PIL.Image.fromarray(half, "RGBA"))[0, 0, :, 0, 0]
    torch.testing.assert_close(corner, torch.full((3,), (1 - 128 / 255) * 2 - 1))  # half black, half white


def test_a_wide_image_is_padded_to_square_on_white_centred(tiny_pipeline):
    wide = np.zeros((SIZE, 2 * SIZE, 3), dtype=np.uint8)  # 2:1 black: the object fills the middle band
    image = tiny_pipeline.preprocess_source(PIL.Image.fromarray(wide))[0, 0]
    assert image.shape == (3, SIZE, SIZE)
    # 32x16 pads to 32x32 (8 white rows above and below), then shrinks 2x: rows 0-3 and 12-15 are white.
    torch.testing.assert_close(image[:, :4], torch.ones(3, 4, SIZE))
    torch.testing.assert_close(image[:, 12:], torch.ones(3, 4, SIZE))
    torch.testing.assert_close(image[:, 4:12], -torch.ones(3, 8, SIZE))
    tall = tiny_pipeline.preprocess_source(torch.zeros(3, 2 * SIZE, SIZE) - 1)[0, 0]
    torch.testing.assert_close(tall, image.transpose(-1, -2))


def test_pil_images_are_area_downsampled_as_the_loaders_do(tiny_pipeline):
    array = (np.random.default_rng(1).random((4 * SIZE, 4 * SIZE, 3)) * 255).astype(np.uint8)
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1
    half = torch.nn.functional.interpolate(tensor[None], size=(2 * SIZE, 2 * SIZE), mode="area")[0]
    expected = tiny_pipeline.preprocess_source(half)
    torch.testing.assert_close(tiny_pipeline.preprocess_source(PIL.Image.fromarray(array)), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny_pipeline.preprocess_source(array), expected, atol=1e-5, rtol=0)
    area = torch.nn.functional.interpolate(tensor[None], size=(SIZE, SIZE), mode="area")
    torch.testing.assert_close(expected[0], area, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "2d-array", "I;16"])
def test_grayscale_and_palette_images_are_accepted(tiny_pipeline, mode):
    gray = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 256).astype(np.uint8)
    expected = torch.from_numpy(gray).float().div(127.5).sub(1).expand(3, SIZE, SIZE)
    if mode == "2d-array":
        source = gray
    elif mode == "I;16":
        source = PIL.Image.fromarray(gray.astype(np.uint16) * 257)
    else:
        source = PIL.Image.fromarray(gray, "L").convert(mode)
    image = tiny_pipeline.preprocess_source(source)
    assert image.shape == (1, 1, 3, SIZE, SIZE)
    if mode != "P":  # the palette quantises grey levels
        torch.testing.assert_close(image[0, 0], expected, atol=1e-5, rtol=0)
    images = run(tiny_pipeline, source, orbit_rays([30.0], size=SIZE), num_inference_steps=1)
    assert images.shape == (1, 3, SIZE, SIZE)
