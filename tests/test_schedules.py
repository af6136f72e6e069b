import numpy as np
import pytest
import torch
from conftest import oracle_pipeline, psnr
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from soda_diffusers.cameras import orbit_rays
from soda_diffusers.schedules import SCHEDULES, schedule_name, scheduler_config

SCHEDULERS = [DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler]


def clean_image(size: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(1, 3, size, size, generator=generator) * 1.6 - 0.8
    return torch.nn.functional.avg_pool2d(image, 3, 1, 1)


def generate(scheduler, clean, steps=50):
    pipe = oracle_pipeline(scheduler, clean)
    source = torch.zeros(3, 16, 16)
    rays = orbit_rays([15.0], size=16)
    out = pipe(source, rays, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt")
    return out.images


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_with_an_oracle_lands_on_the_clean_image(schedule, prediction_type):
    clean = clean_image()
    scheduler = DDIMScheduler.from_config(scheduler_config(schedule, prediction_type))
    images = generate(scheduler, clean)
    assert psnr(images, (clean + 1) / 2) >= 40


@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=lambda c: c.__name__)
def test_every_scheduler_swaps_in_and_lands_on_the_clean_image(scheduler_class):
    clean = clean_image()
    scheduler = scheduler_class.from_config(scheduler_config("inverted_cosine", "v_prediction"))
    assert scheduler.config.prediction_type == "v_prediction"
    np.testing.assert_allclose(scheduler.betas.numpy(), scheduler_config()["trained_betas"], rtol=1e-5)
    images = generate(scheduler, clean, steps=25)
    # DDPM is stochastic on the way, but its last step predicts x0 from the oracle too.
    assert psnr(images, (clean + 1) / 2) >= 35


def test_inverted_cosine_spends_its_steps_on_middle_noise_levels():
    betas = np.array(scheduler_config("inverted_cosine")["trained_betas"])
    inverted = np.cumprod(1 - betas)
    cosine = DDIMScheduler.from_config(scheduler_config("cosine")).alphas_cumprod.numpy()
    t = np.arange(1000) / 1000
    # alpha_bar = (2/pi) arccos(sqrt(t)): one at the start, zero at the end, exactly invertible.
    np.testing.assert_allclose(np.cos(np.pi / 2 * inverted[:-1]) ** 2, t[1:], atol=2e-3)
    assert inverted[-1] < 1e-3 and cosine[-1] < 1e-3
    snr_weight = lambda ab: np.mean((ab > 0.1) & (ab < 0.9))  # noqa: E731
    assert snr_weight(inverted) > snr_weight(cosine)


def test_schedule_name_round_trips_and_bad_names_are_rejected():
    for schedule in SCHEDULES:
        assert schedule_name(DDIMScheduler.from_config(scheduler_config(schedule)).config) == schedule
    with pytest.raises(ValueError, match="schedule"):
        scheduler_config("sigmoid")
    with pytest.raises(ValueError, match="prediction_type"):
        scheduler_config("linear", "score")
