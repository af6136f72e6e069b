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
    assert images.device.type == "cpu" or images.is_cuda
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
    assert "cuda" not in summary["hardware"].lower() or summary["peak_gpu_memory_gib"] > 0


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
