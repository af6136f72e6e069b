"""Noise schedules as Diffusers scheduler configs.

Every schedule is written as a scheduler config, so DDPM, DDIM, DPM-Solver, Euler, UniPC, ...
are swapped with ``SchedulerClass.from_config(pipe.scheduler.config)``:

* ``linear`` and ``cosine`` use Diffusers' own ``beta_schedule`` names (``linear``,
  ``squaredcos_cap_v2``);
* ``inverted_cosine`` (SODA) is the inverse function of the cosine schedule,
  ``alpha_bar(t) = (2 / pi) * arccos(sqrt(t))``: where the cosine schedule spends its steps near
  the clean and the pure-noise ends, this one spends them on middle noise levels. Diffusers has no
  name for it, so it travels as ``trained_betas``.

The configs set ``timestep_spacing="trailing"`` (sampling starts at the last training step, pure
noise) and ``set_alpha_to_one=True`` (DDIM's last step lands on ``alpha_bar = 1``, the clean
image, instead of stopping at ``alpha_bar[0]`` with some predicted noise left in).
"""

from __future__ import annotations

import math

import numpy as np
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

SCHEDULES = ("inverted_cosine", "cosine", "linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Samplers by their command-line names; every one is built from the pipeline's own scheduler config,
# so the noise schedule and prediction type the model was trained with carry over.
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "unipc": UniPCMultistepScheduler,
}


def inverted_cosine_alpha_bar(t: np.ndarray) -> np.ndarray:
    return (2.0 / math.pi) * np.arccos(np.sqrt(np.clip(t, 0.0, 1.0)))


def betas_for_alpha_bar(alpha_bar, num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous ``alpha_bar(t)``, t in [0, 1], into ``num_train_timesteps`` betas."""
    t = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    values = alpha_bar(t)
    return np.minimum(1.0 - values[1:] / values[:-1], max_beta)


def scheduler_config(
    schedule: str = "inverted_cosine",
    prediction_type: str = "epsilon",
    num_train_timesteps: int = 1000,
) -> dict:
    """A config that every Diffusers noise scheduler accepts in ``from_config``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
    config = {
        "num_train_timesteps": num_train_timesteps,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": {"linear": "linear", "cosine": "squaredcos_cap_v2"}.get(schedule, "linear"),
        "trained_betas": None,
        "prediction_type": prediction_type,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": "trailing",
    }
    if schedule == "inverted_cosine":
        config["trained_betas"] = betas_for_alpha_bar(inverted_cosine_alpha_bar, num_train_timesteps).tolist()
    return config


def schedule_name(config) -> str:
    """Which of :data:`SCHEDULES` a scheduler config holds (``"custom"`` when none)."""
    betas = config.get("trained_betas")
    if betas is not None:
        expected = betas_for_alpha_bar(inverted_cosine_alpha_bar, config["num_train_timesteps"])
        return "inverted_cosine" if np.allclose(betas, expected, atol=1e-6) else "custom"
    return {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(config.get("beta_schedule"), "custom")


def set_scheduler(pipe, name: str):
    """Swap ``pipe``'s sampler for the one called ``name`` in :data:`SCHEDULERS`, keeping its schedule
    (``Class.from_config(pipe.scheduler.config)``). Returns ``pipe``."""
    scheduler_class = SCHEDULERS.get(str(name).lower())
    if scheduler_class is None:
        raise ValueError(f"scheduler: expected one of {sorted(SCHEDULERS)}, got {name!r}")
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    return pipe
