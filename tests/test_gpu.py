"""GPU paths: run when CUDA is present, skipped (with the reason shown by ``-ra``) otherwise."""

import pytest
import torch
from conftest import make_tiny_pipeline

from soda_diffusers import orbit_rays

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none found")


@requires_cuda
@pytest.mark.gpu
def test_pipeline_on_gpu_in_half_precision_matches_fp32():
    pipe = make_tiny_pipeline()
    rays = orbit_rays([15.0, 30.0], size=16)
    source = torch.zeros(3, 16, 16)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    reference = pipe(source, rays, num_inference_steps=5, latents=noise, output_type="pt").images
    pipe = pipe.to("cuda", torch.float16)
    images = pipe(source, rays, num_inference_steps=5, latents=noise, output_type="pt").images
    assert images.is_cuda and images.dtype == torch.float32  # on the device, as Diffusers' pipelines return them
    assert (images.float().cpu() - reference).abs().mean() < 0.02


@requires_cuda
@pytest.mark.gpu
def test_a_few_bf16_training_steps_on_gpu_with_the_speed_flags(tmp_path):
    import json

    from test_training import load_script, train_flags

    from soda_diffusers.data import make_synthetic_nmr

    data = make_synthetic_nmr(tmp_path / "nmr", objects_per_category=3, seed=0, categories=["airplane", "car"])
    train = load_script()
    flags = train_flags(data, tmp_path / "run", steps=4, mixed_precision="bf16", channels_last="true",
                        fused_adamw="true", allow_tf32="true", dataloader_num_workers=2)
    assert train.main(flags) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(record["loss"] == record["loss"] for record in log)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert torch.cuda.get_device_name() in summary["hardware"] and summary["peak_gpu_memory_gib"] > 0


@requires_cuda
@pytest.mark.gpu
def test_save_and_load_round_trip_on_gpu_is_exact(tmp_path):
    from soda_diffusers import SODANovelViewPipeline

    pipe = make_tiny_pipeline().to("cuda")
    rays = orbit_rays([15.0, 90.0], size=16)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = pipe(torch.zeros(3, 16, 16), rays, num_inference_steps=5, latents=noise, output_type="pt").images
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = SODANovelViewPipeline.from_pretrained(tmp_path / "pipe").to("cuda")
    loaded.set_progress_bar_config(disable=True)
    for name in ("encoder", "unet"):
        for key, value in getattr(pipe, name).state_dict().items():
            assert torch.equal(value, getattr(loaded, name).state_dict()[key]), key
    after = loaded(torch.zeros(3, 16, 16), rays, num_inference_steps=5, latents=noise, output_type="pt").images
    assert torch.equal(before, after)


@requires_cuda
@pytest.mark.gpu
def test_ddim_orbit_on_gpu():
    pipe = make_tiny_pipeline().to("cuda", torch.bfloat16)
    rays = orbit_rays([15.0 * i for i in range(1, 24)], size=16)
    images = pipe(torch.zeros(3, 16, 16), rays, num_inference_steps=10, output_type="pt",
                  generator=torch.Generator("cuda").manual_seed(0)).images
    assert images.shape == (23, 3, 16, 16) and torch.isfinite(images.float()).all()


@requires_cuda
@pytest.mark.gpu
def test_model_cpu_offload_runs_each_model_on_the_gpu_and_matches_the_gpu_pipeline():
    # The latents and rays must follow the model onto the GPU (_execution_device), not stay where the
    # offloaded pipeline's parameters rest (the CPU).
    pipe = make_tiny_pipeline()
    rays = orbit_rays([15.0, 30.0], size=16)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    reference = pipe.to("cuda")(torch.zeros(3, 16, 16), rays, num_inference_steps=5, latents=noise, output_type="pt").images
    pipe = make_tiny_pipeline()
    pipe.enable_model_cpu_offload()
    assert pipe.device.type == "cpu" and pipe._execution_device.type == "cuda"
    images = pipe(torch.zeros(3, 16, 16), rays, num_inference_steps=5, latents=noise, output_type="pt").images
    assert images.is_cuda
    torch.testing.assert_close(images, reference, atol=1e-4, rtol=0)
    assert next(pipe.unet.parameters()).device.type == "cpu"  # moved back after the call


@requires_cuda
@pytest.mark.gpu
def test_loading_with_torch_dtype_float16_samples_on_the_gpu(tmp_path):
    from soda_diffusers import SODANovelViewPipeline

    pipe = make_tiny_pipeline()
    rays = orbit_rays([15.0, 30.0], size=16)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    reference = pipe(torch.zeros(3, 16, 16), rays, num_inference_steps=5, latents=noise, output_type="pt").images
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = SODANovelViewPipeline.from_pretrained(tmp_path / "pipe", torch_dtype=torch.float16).to("cuda")
    assert loaded.unet.dtype == loaded.encoder.dtype == torch.float16
    loaded.set_progress_bar_config(disable=True)
    images = loaded(torch.zeros(3, 16, 16), rays, num_inference_steps=5, latents=noise, output_type="pt").images
    assert (images.cpu() - reference).abs().mean() < 0.02
