#!/usr/bin/env python
"""Train a SODA novel-view model (encoder + z-modulated U-Net) with Accelerate.

    accelerate launch training/train_soda.py --config training/configs/synthetic-tiny.yaml [--key value ...]
    python training/train_soda.py --config training/configs/nmr-32.yaml --data /data/NMR_Dataset.zip

Flags override the YAML config, which overrides the defaults below. Without ``--data`` the
built-in synthetic NMR-format dataset is generated on first use.

Every training step is a pure function of (weights, optimizer state, step): the step's objects,
views, timesteps, noise and z-dropout each come from their own random stream, seeded with
``(seed, step, process, stream)`` (:mod:`soda_diffusers.data.pairs`). So a run resumed from
``checkpoint-<step>`` continues exactly where the interrupted run was, and the data position is simply
the step number (with ``--streaming``, the stream's position is saved in the checkpoint too).

The data is read from a memory-mapped store of the split (:class:`~soda_diffusers.data.ViewStore`),
built once on first use by the main process; every process and DataLoader worker then maps the same
files. A stop (Ctrl-C or SIGTERM on any process, the end of the budget, a NaN loss) is decided by all
processes together at the end of a step, so they save the same checkpoint and leave together.

A run's budget is ``--max_train_steps``, or with ``--max_train_minutes`` the clock: then the learning-rate
schedule, its warm-up and the EMA warm-up run on the fraction of the minutes used (:class:`TrainingClock`),
so the run ends annealed however many steps the machine gives. Every ``--validation_steps`` the run scores
fixed val pairs with ``soda-nvs evaluate``'s metrics (:class:`~soda_diffusers.evaluation.runner.PairScorer`) into
``train_log.jsonl`` and TensorBoard, and at the end draws them against minutes in ``learning_curve.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

from soda_diffusers.threads import set_wait_policy

THREAD_SETTINGS = set_wait_policy()  # before torch loads OpenMP (soda_diffusers.threads)

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from soda_diffusers import SODAEncoder, SODANovelViewPipeline
from soda_diffusers.data import StepBatches, ViewStore, default_synthetic_dataset
from soda_diffusers.data.pairs import stream_generator, stream_seed
from soda_diffusers.evaluation.runner import PairScorer
from soda_diffusers.hardware import matmul_peak_tflops
from soda_diffusers.schedules import scheduler_config
from soda_diffusers.visualize import make_grid, plot_learning_curve

logger = get_logger(__name__)
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
TRAIN_LOG = "train_log.jsonl"
LEARNING_CURVE = "learning_curve.png"
CALIBRATION_BATCHES = 16  # training batches that set the EMA encoder's batch-norm statistics

DEFAULTS = {
    "data": None,
    "synthetic_objects_per_category": 30,
    "categories": None,
    "data_cache_dir": None,
    "streaming": False,
    "shuffle_buffer": 1000,
    "num_source_views": 1,
    "dataloader_num_workers": 0,
    "preset": "soda-tiny",
    "encoder": {},
    "unet": {},
    "prediction_type": None,
    "noise_schedule": None,
    "output_dir": "outputs/soda",
    "train_batch_size": 32,
    "max_train_steps": 1000,
    "max_train_minutes": None,
    "learning_rate": 1e-3,
    "encoder_learning_rate": None,
    "adam_beta1": 0.9,
    "adam_beta2": 0.99,
    "adam_weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 100,
    "snr_gamma": None,
    "loss_weighting": "none",
    "input_perturbation": 0.0,
    "z_drop_prob": 0.1,
    "layer_mask_prob": 0.0,
    "timestep_bias_strategy": "none",
    "timestep_bias_multiplier": 1.0,
    "timestep_bias_portion": 0.25,
    "timestep_bias_begin": 0,
    "timestep_bias_end": 1000,
    "use_ema": True,
    "ema_decay": 0.999,
    "ema_power": 0.75,
    "gradient_checkpointing": False,
    "checkpointing_steps": 500,
    "checkpoints_total_limit": 3,
    "resume_from_checkpoint": None,
    "validation_steps": 250,
    "validation_objects": 8,
    "validation_views": 4,
    "validation_inference_steps": 10,
    "mixed_precision": "no",
    "seed": 0,
    "report_to": "tensorboard",
    "logging_dir": "logs",
    "torch_threads": None,
    "allow_tf32": False,
    "channels_last": False,
    "fused_adamw": False,
    "torch_compile": False,
    "attention_backend": "sdpa",
    "push_to_hub": False,
    "hub_model_id": None,
    "hub_private": False,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of flag values (a name from training/configs or a path)")
    for key, default in DEFAULTS.items():
        if isinstance(default, dict):
            parser.add_argument(f"--{key}", type=json.loads, help=f"JSON object of {key} config overrides")
        elif isinstance(default, bool):
            parser.add_argument(f"--{key}", type=_parse_bool, nargs="?", const=True)
        else:
            kind = type(default) if default is not None else str
            kind = float if key in ("max_train_minutes", "snr_gamma", "encoder_learning_rate") else kind
            kind = int if key in ("torch_threads",) else kind
            parser.add_argument(f"--{key}", type=kind)
    args = parser.parse_args(argv)

    values = dict(DEFAULTS)
    if args.config:
        config_path = Path(args.config)
        if not config_path.is_file():
            config_path = CONFIGS_DIR / f"{args.config.removesuffix('.yaml')}.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"--config: no file {args.config} (nor {config_path})")
        from_file = yaml.safe_load(config_path.read_text()) or {}
        unknown = set(from_file) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"--config {config_path}: unknown keys {sorted(unknown)}")
        values.update(from_file)
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    values["config"] = args.config
    return argparse.Namespace(**values)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_pipeline(args) -> SODANovelViewPipeline:
    """The untrained pipeline: the preset with the config's overrides. The noise schedule and
    prediction type go into the pipeline's own scheduler, so the exported sampler matches training."""
    scheduler = {}
    if args.noise_schedule:
        schedule = scheduler_config(args.noise_schedule)
        scheduler.update(beta_schedule=schedule["beta_schedule"], trained_betas=schedule["trained_betas"])
    if args.prediction_type:
        scheduler["prediction_type"] = args.prediction_type
    return SODANovelViewPipeline.from_preset(args.preset, encoder=args.encoder, unet=args.unet, scheduler=scheduler)


def data_path(args) -> str:
    if args.data:
        return args.data
    return str(default_synthetic_dataset(objects_per_category=args.synthetic_objects_per_category, seed=0))


def batch_source(args, split: str, image_size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_source_views: int | None = None, stores: dict | None = None):
    """What the step's batches come from: ``source.batch(step)`` is the batch of ``step`` on ``rank``.
    A memory-mapped :class:`ViewStore` of the split (built on first use; ``stores``, by split, lets the
    sources of one run open each store once), or with ``--streaming`` the split read as a ``datasets``
    stream, this rank's shard of it."""
    k = args.num_source_views if num_source_views is None else num_source_views
    if args.streaming:
        from soda_diffusers.data import StreamingBatches

        return StreamingBatches(data_path(args), split, image_size, batch_size, seed, rank=rank,
                                world_size=world_size, num_source_views=k, categories=args.categories,
                                shuffle_buffer=args.shuffle_buffer)
    stores = {} if stores is None else stores
    if split not in stores:
        stores[split] = ViewStore.open(data_path(args), split, image_size, args.categories, cache_dir=args.data_cache_dir)
    return StepBatches(stores[split], batch_size, seed, rank, k)


def training_batches(source, first_step: int, last_step: int, args, device: torch.device):
    """The batches of steps ``first_step..last_step - 1`` in order: a DataLoader over the store (its
    workers build whole batches, each a function of its step), or the stream read in this process."""
    if args.streaming:
        return (source.batch(step) for step in range(first_step, last_step))
    workers = args.dataloader_num_workers
    return iter(torch.utils.data.DataLoader(
        source, batch_size=None, sampler=range(first_step, last_step), num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
        persistent_workers=False, worker_init_fn=_ignore_stop_signals if workers else None,
    ))


def _ignore_stop_signals(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the workers leave it to the main process, which finishes
    # the step, saves and shuts them down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# PyTorch's scaled-dot-product attention backends (Diffusers' default attention processor calls SDPA);
# "sdpa" lets PyTorch choose per call.
ATTENTION_BACKENDS = ("sdpa", "flash", "efficient", "cudnn", "math")


def set_speed_options(args, encoder, unet):
    """Apply the GPU speed flags to the models and the process; returns the attention context of the
    training step. Each flag is measured by ``benchmarks/bench_models.py`` before it becomes a default."""
    if args.attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention_backend: expected one of {ATTENTION_BACKENDS}, got {args.attention_backend!r}")
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.channels_last:
        encoder.to(memory_format=torch.channels_last)
        unet.to(memory_format=torch.channels_last)
    if args.attention_backend == "sdpa":
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[args.attention_backend]
    return lambda: sdpa_kernel(backend)


def to_device(batch: dict, device, channels_last: bool = False) -> dict:
    """The batch on ``device``; images in channels-last layout with ``--channels_last`` (the models' layout)."""
    moved = {}
    for key, value in batch.items():
        value = value.to(device, non_blocking=True)
        if channels_last and value.ndim == 4:
            value = value.contiguous(memory_format=torch.channels_last)
        moved[key] = value
    return moved


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, total_limit: int | None,
                    train_seconds: float = 0.0) -> Path:
    """Write ``checkpoint-<step>`` atomically (a temporary directory renamed at the end, so a
    run killed while saving never leaves a half checkpoint behind), keeping the last ``total_limit``.
    ``step.json`` holds the step and the training time used so far (:class:`TrainingClock`)."""
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".partial-checkpoint-{step}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()  # every process has written its part before the rename
    if accelerator.is_main_process:
        (partial / "step.json").write_text(json.dumps({"step": step, "train_seconds": train_seconds}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if total_limit:
            for old in checkpoint_dirs(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "step.json").is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint: {path} is not a checkpoint directory (no step.json)")
    return path


class StopRequest:
    """Turns Ctrl-C and SIGTERM into a flag, so the loop can save a checkpoint and exit cleanly;
    ``restore()`` gives the signals back to their former handlers when the loop is over (the quickstart
    goes on to evaluate in the same process, and must stop at once there)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_number = 0
        self.former = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.signal_number:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal_number = int(signum)

    def restore(self) -> None:
        for sig, handler in self.former.items():
            signal.signal(sig, handler)


class TrainingClock:
    """How far a run is through its budget: ``fraction`` in [0, 1] of ``--max_train_steps``, or with
    ``--max_train_minutes`` the larger of the fractions of the minutes and of the steps used (so either
    ends the run). ``seconds`` is the training time of all the run's sessions: checkpoints keep it, so
    a resumed run continues at the fraction it had reached.

    With a time budget the schedules follow the clock, as in budgeted training (Li et al., ICLR 2020):
    the LR schedule and the EMA warm-up see ``schedule_step = fraction * max_train_steps``, so step-valued
    settings (``--lr_warmup_steps``, the EMA's warm-up) are read as that share of the budget and the LR
    reaches its final value exactly when the budget ends, whether the machine gives 1,500 steps or 4,000.
    Without one, ``schedule_step`` is the step itself, and a resumed run is bitwise the uninterrupted one."""

    def __init__(self, max_steps: int, max_minutes: float | None = None, step: int = 0, seconds: float = 0.0):
        self.max_steps, self.max_seconds = max_steps, 60 * max_minutes if max_minutes else None
        self.step, self.seconds = step, seconds

    @property
    def follows_time(self) -> bool:
        return self.max_seconds is not None

    @property
    def fraction(self) -> float:
        fraction = self.step / self.max_steps
        if self.follows_time:
            fraction = max(fraction, self.seconds / self.max_seconds)
        return min(1.0, fraction)

    @property
    def schedule_step(self) -> float:
        return self.fraction * self.max_steps if self.follows_time else self.step

    @property
    def done(self) -> bool:
        return self.fraction >= 1.0

    def follow(self, lr_scheduler, steps_per_step: int = 1) -> None:
        """Drive ``lr_scheduler`` (a ``LambdaLR`` from ``diffusers.optimization.get_scheduler``, planned for
        ``steps_per_step`` of its steps per training step) by :attr:`schedule_step` instead of its own count."""
        if self.follows_time:
            lr_scheduler.lr_lambdas = [lambda _, f=f: f(self.schedule_step * steps_per_step)
                                       for f in lr_scheduler.lr_lambdas]


def training_target(noise_scheduler, clean, noise, timesteps):
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps)
    return clean


def timestep_weights(args, num_timesteps: int) -> torch.Tensor | None:
    """Sampling weights of the training timesteps, as the Diffusers SDXL example's ``--timestep_bias_*``
    flags set them: ``later`` (``earlier``) multiplies the weight of the noisiest (least noisy)
    ``portion`` of the timesteps, ``range`` that of ``[begin, end)``. None: uniform."""
    strategy, portion = args.timestep_bias_strategy, args.timestep_bias_portion
    begin, end = args.timestep_bias_begin, args.timestep_bias_end
    if strategy not in ("none", "earlier", "later", "range"):
        raise ValueError(f"--timestep_bias_strategy: expected none, earlier, later or range, got {strategy!r}")
    if strategy == "none":
        return None
    if args.timestep_bias_multiplier <= 0:
        raise ValueError(f"--timestep_bias_multiplier: expected > 0, got {args.timestep_bias_multiplier}")
    if strategy == "range":
        if not 0 <= begin < end <= num_timesteps:
            raise ValueError(
                f"--timestep_bias_begin/--timestep_bias_end: expected 0 <= begin < end <= {num_timesteps}, "
                f"got {begin}, {end}"
            )
    elif not 0 < portion <= 1:
        raise ValueError(f"--timestep_bias_portion: expected a fraction in (0, 1], got {portion}")
    else:
        count = int(portion * num_timesteps)
        begin, end = (num_timesteps - count, num_timesteps) if strategy == "later" else (0, count)
    weights = torch.ones(num_timesteps)
    weights[begin:end] *= args.timestep_bias_multiplier
    return weights / weights.sum()


def draw_timesteps(generator, batch_size: int, num_timesteps: int, timestep_probs=None) -> torch.Tensor:
    """Training timesteps: uniform, or drawn with probabilities ``timestep_probs`` (:func:`timestep_weights`)."""
    if timestep_probs is None:
        return torch.randint(num_timesteps, (batch_size,), generator=generator)
    return torch.multinomial(timestep_probs, batch_size, replacement=True, generator=generator)


LOSS_WEIGHTINGS = ("none", "clean_image")


def check_loss_weighting(loss_weighting: str) -> None:
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"--loss_weighting: expected one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}")


def loss_weights(noise_scheduler, timesteps, loss_weighting: str = "none", snr_gamma: float | None = None):
    """Per-sample weights of the prediction's squared error, or None for weight 1 (``loss_weighting``
    ``none``: the error of what the U-Net predicts). ``clean_image`` weighs it so that the loss is the
    error of the clean image the prediction implies: ``1 / SNR`` for the noise, ``1 / (1 + SNR)`` for v.
    ``snr_gamma``: min-SNR-gamma (Hang et al. 2023), that clean-image error weighted by ``min(SNR, gamma)``."""
    check_loss_weighting(loss_weighting)
    prediction_type = noise_scheduler.config.prediction_type
    if not snr_gamma and (loss_weighting == "none" or prediction_type == "sample"):
        return None
    snr = compute_snr(noise_scheduler, timesteps)
    weight = {"epsilon": 1 / snr, "v_prediction": 1 / (snr + 1)}.get(prediction_type, torch.ones_like(snr))
    if snr_gamma:
        weight = weight * snr.clamp(max=snr_gamma)
    return weight


def drop_conditioning(z, generator, z_drop_prob: float = 0.0, layer_mask_prob: float = 0.0, chunk_sizes=None):
    """Training-time latent dropout: the whole ``z`` with probability ``z_drop_prob`` (the unconditional model
    that classifier-free guidance asks for) and, with layer-wise modulation (``chunk_sizes``: the U-Net's
    ``z_chunk_sizes``), each level's chunk with ``layer_mask_prob`` (SODA's layer masking)."""
    keep = torch.ones(z.shape[0], 1)
    if layer_mask_prob > 0 and chunk_sizes:
        chunk_keep = (torch.rand(z.shape[0], len(chunk_sizes), generator=generator) >= layer_mask_prob).float()
        keep = chunk_keep.repeat_interleave(torch.tensor(chunk_sizes), dim=1)
    if z_drop_prob > 0:
        keep = keep * (torch.rand(z.shape[0], 1, generator=generator) >= z_drop_prob).float()
    return z * keep.to(z.device, z.dtype)


def diffusion_loss(encoder, unet, noise_scheduler, batch, generators: dict, timestep_probs=None,
                   loss_weighting="none", snr_gamma=None, input_perturbation=0.0, z_drop_prob=0.0,
                   layer_mask_prob=0.0, chunk_sizes=None):
    """Denoising loss of one batch. ``generators`` holds one stream per random quantity, so that none is tied
    to another (or to the batch's objects): ``timesteps`` (uniform, or drawn with probabilities
    ``timestep_probs``), ``noise`` and ``conditioning`` (:func:`drop_conditioning`; only with a dropout).
    ``input_perturbation``: the U-Net's input gets that much more fresh noise than its target accounts for
    (Ning et al. 2023, as Diffusers' text-to-image example). Weighted by :func:`loss_weights`."""
    clean = batch["target_image"]
    timesteps = draw_timesteps(generators["timesteps"], clean.shape[0], noise_scheduler.config.num_train_timesteps,
                               timestep_probs).to(clean.device)
    noise = torch.randn(clean.shape, generator=generators["noise"]).to(clean.device, clean.dtype)
    input_noise = noise
    if input_perturbation:
        perturbation = torch.randn(clean.shape, generator=generators["noise"]).to(clean.device, clean.dtype)
        input_noise = noise + input_perturbation * perturbation
    noisy = noise_scheduler.add_noise(clean, input_noise, timesteps)
    z = encoder(batch["source_image"], batch.get("source_rays"))
    if z_drop_prob or layer_mask_prob:
        z = drop_conditioning(z, generators["conditioning"], z_drop_prob, layer_mask_prob, chunk_sizes)
    prediction = unet(noisy, timesteps, batch["target_rays"], z).sample
    target = training_target(noise_scheduler, clean, noise, timesteps)
    loss = (prediction.float() - target.float()).square().mean(dim=(1, 2, 3))
    weight = loss_weights(noise_scheduler, timesteps, loss_weighting, snr_gamma)
    if weight is not None:
        loss = loss * weight
    return loss.mean()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (user/repo)")  # before training, not after
    check_loss_weighting(args.loss_weighting)  # before training, not at its first step
    for flag in ("z_drop_prob", "layer_mask_prob"):
        if not 0 <= getattr(args, flag) < 1:
            raise ValueError(f"--{flag}: expected a probability in [0, 1), got {getattr(args, flag)}")
    if args.input_perturbation < 0:
        raise ValueError(f"--input_perturbation: expected >= 0, got {args.input_perturbation}")
    if args.streaming and not args.data:
        raise ValueError("--streaming needs --data: a Hub dataset id or a folder of Parquet files (data/<split>-*.parquet)")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    output_dir = Path(args.output_dir)
    report_to = None if args.report_to in (None, "none") else args.report_to
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            report_to = None
    accelerator = Accelerator(
        # Accelerate forms a CPU process group (gloo) only when told to run on CPU; without a GPU, several
        # processes (accelerate launch --num_processes N, torchrun) would otherwise each train alone.
        cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        # torch.compile through Accelerate: prepare() compiles both models (inductor).
        dynamo_backend="inductor" if args.torch_compile else "no",
        log_with=report_to or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    if report_to is None and args.report_to == "tensorboard" and accelerator.is_main_process:
        print("tensorboard is not installed: logging to train_log.jsonl only (pip install tensorboard)")
    set_seed(args.seed)

    pipe = build_pipeline(args)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    timestep_probs = timestep_weights(args, noise_scheduler.config.num_train_timesteps)
    encoder, unet = pipe.encoder.train(), pipe.unet.train()
    chunk_sizes = unet.z_chunk_sizes if unet.config.layerwise_modulation else None
    image_size = unet.config.sample_size
    attention = set_speed_options(args, encoder, unet)
    if args.gradient_checkpointing:
        encoder.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()

    rank, world_size = accelerator.process_index, accelerator.num_processes
    with accelerator.main_process_first():
        stores = {}
        train_source = batch_source(args, "train", image_size, args.train_batch_size, args.seed, rank, world_size,
                                    stores=stores)
        # Batches of their own (one source view: the encoder's batch norm sees single views), so that
        # exporting a pipeline leaves the training batches untouched.
        calibration_source = batch_source(args, "train", image_size, args.train_batch_size, args.seed + 3,
                                          num_source_views=1, stores=stores)
        val_source = batch_source(args, "val", image_size, min(args.train_batch_size, 64), args.seed + 1,
                                  stores=stores)
        scorer = None
        if accelerator.is_main_process and not args.streaming:
            scorer = PairScorer.from_data(data_path(args), "val", image_size, args.validation_objects,
                                          args.validation_views, categories=args.categories)

    decoder_lr = args.learning_rate
    encoder_lr = args.encoder_learning_rate or decoder_lr
    optimizer = torch.optim.AdamW(
        [{"params": encoder.parameters(), "lr": encoder_lr}, {"params": unet.parameters(), "lr": decoder_lr}],
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        fused=args.fused_adamw or None,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    clock = TrainingClock(args.max_train_steps, args.max_train_minutes)
    clock.follow(lr_scheduler, accelerator.num_processes)
    ema_models = {}
    if args.use_ema:
        for name, model in (("encoder", encoder), ("unet", unet)):
            ema_models[name] = EMAModel(
                model.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=args.ema_power,
                model_cls=type(model), model_config=model.config,
            )

    def save_model_hook(models, weights, directory):
        if args.streaming:  # every process's position in its shard of the stream
            Path(directory, f"stream_state_{rank}.json").write_text(json.dumps(train_source.state_dict()))
        if accelerator.is_main_process:
            for name, ema in ema_models.items():
                ema.save_pretrained(os.path.join(directory, f"{name}_ema"))
            for model in models:
                model = accelerator.unwrap_model(model, keep_torch_compile=False)
                name = "encoder" if isinstance(model, SODAEncoder) else "unet"
                model.save_pretrained(os.path.join(directory, name))
                weights.pop()

    def load_model_hook(models, directory):
        if args.streaming:
            train_source.load_state_dict(json.loads(Path(directory, f"stream_state_{rank}.json").read_text()))
        for name, ema in ema_models.items():
            loaded = EMAModel.from_pretrained(os.path.join(directory, f"{name}_ema"), type(getattr(pipe, name)))
            ema.load_state_dict(loaded.state_dict())
            ema.to(accelerator.device)
        while models:
            model = accelerator.unwrap_model(models.pop(), keep_torch_compile=False)
            model_class = type(model)
            name = "encoder" if model_class is SODAEncoder else "unet"
            loaded = model_class.from_pretrained(directory, subfolder=name)
            model.load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    encoder, unet, optimizer, lr_scheduler = accelerator.prepare(encoder, unet, optimizer, lr_scheduler)
    for ema in ema_models.values():
        ema.to(accelerator.device)

    first_step = 0
    resume_path = resolve_resume(output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint and resume_path is None:
        accelerator.print(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}, starting from scratch")
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        saved = json.loads((resume_path / "step.json").read_text())
        first_step = clock.step = saved["step"]
        clock.seconds = saved.get("train_seconds", 0.0)
        accelerator.print(f"resumed from {resume_path} at step {first_step}, {clock.fraction:.0%} of the budget")

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(vars(args), indent=2, default=str))
        accelerator.init_trackers("soda", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    log_path = output_dir / TRAIN_LOG
    if accelerator.is_main_process and first_step == 0 and log_path.exists():
        log_path.unlink()
    elif accelerator.is_main_process and log_path.exists():
        # Drop log lines past the checkpoint we resume from: they will be written again.
        lines = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= first_step]
        log_path.write_text("".join(line + "\n" for line in lines))

    val_batch = val_source.batch(0)

    matmul_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    matmul_tflops_start = matmul_peak_tflops(accelerator.device, matmul_dtype)
    stop = StopRequest()
    bar = tqdm(total=round(clock.max_seconds) if clock.follows_time else args.max_train_steps,
               initial=round(clock.seconds) if clock.follows_time else first_step,
               unit="s" if clock.follows_time else "step", desc="training", disable=not accelerator.is_local_main_process)
    session_start, session_seconds = time.monotonic(), clock.seconds
    first_step_at = time.time()  # wall clock, for benchmarks that time the whole start-up
    first_step_seconds = None
    train_seconds = 0.0
    exit_code = 0
    step = first_step
    batches = training_batches(train_source, first_step, args.max_train_steps, args, accelerator.device)
    while not clock.done:
        step_start = time.monotonic()
        # Dropout layers inside the models draw from the global RNG: its own stream, per step.
        torch.manual_seed(stream_seed(args.seed, step, rank, "dropout"))
        batch = to_device(next(batches), accelerator.device, args.channels_last)
        data_seconds = time.monotonic() - step_start
        encoder.train()
        unet.train()
        with accelerator.autocast(), attention():
            generators = {name: stream_generator(args.seed, step, rank, name)
                          for name in ("timesteps", "noise", "conditioning")}
            loss = diffusion_loss(
                encoder, unet, noise_scheduler, batch, generators, timestep_probs, args.loss_weighting,
                args.snr_gamma, args.input_perturbation, args.z_drop_prob, args.layer_mask_prob, chunk_sizes,
            )
        finite = accelerator.gather(torch.isfinite(loss.detach()).float()[None]).min() > 0
        if not finite:
            last = checkpoint_dirs(output_dir)
            accelerator.print(
                f"error: the loss became {loss.item()} at step {step}; stopping without saving. "
                f"Last good checkpoint: {last[-1] if last else 'none'}. Try a lower --learning_rate or "
                "--mixed_precision no."
            )
            exit_code = 3
            break
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients and args.max_grad_norm:
            grad_norm = accelerator.clip_grad_norm_([*encoder.parameters(), *unet.parameters()], args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name, model in (("encoder", encoder), ("unet", unet)):
            if name in ema_models:
                if clock.follows_time:  # the EMA warm-up, on the clock's schedule too
                    ema_models[name].optimization_step = round(clock.schedule_step)
                ema_models[name].step(model.parameters())

        completed = step + 1
        train_seconds += time.monotonic() - step_start
        if step == first_step:  # with --torch_compile, the compilation is in this step
            first_step_seconds = time.monotonic() - step_start
        # Every process takes the same decisions and the same learning rate at the same step: a signal to
        # any one of them stops them all here, with one checkpoint, and the clock is the slowest one's.
        # One gather a step carries the decisions and the loss to log.
        local = torch.tensor([stop.signal_number, session_seconds + time.monotonic() - session_start],
                             device=accelerator.device, dtype=torch.float64)
        local = torch.cat([local, loss.detach().double()[None]])[None]
        signals, seconds, losses = accelerator.gather(local).T.tolist()
        clock.step, clock.seconds = completed, max(seconds)
        lr_scheduler.step()
        loss_value = sum(losses) / len(losses)
        logs = {
            "loss": loss_value,
            "lr": lr_scheduler.get_last_lr()[-1],
            "samples_per_s": args.train_batch_size * accelerator.num_processes / (time.monotonic() - step_start),
            "data_s": data_seconds,
        }
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        if completed % args.validation_steps == 0 or clock.done:
            quality_start = time.monotonic()
            logs["val_loss"] = validation_loss(encoder, unet, noise_scheduler, val_batch, accelerator)
            if accelerator.is_main_process:
                logs.update(validation_quality(accelerator, pipe, ema_models, encoder, unet, calibration_source,
                                               scorer, args, completed, output_dir))
            logs["validation_s"] = time.monotonic() - quality_start
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{logs['lr']:.2e}")
        bar.update((round(clock.seconds) if clock.follows_time else completed) - bar.n)
        accelerator.log(logs, step=completed)
        if accelerator.is_main_process:
            with log_path.open("a") as log:
                log.write(json.dumps({"step": completed, "elapsed_s": round(clock.seconds, 3), **logs}) + "\n")

        signalled = any(signals)
        step = completed
        if completed % args.checkpointing_steps == 0 or signalled or clock.done:
            saved = save_checkpoint(accelerator, output_dir, completed, args.checkpoints_total_limit, clock.seconds)
            if signalled:
                reason = ", ".join(f"{signal.Signals(int(number)).name} on process {process}"
                                   for process, number in enumerate(signals) if number)
                accelerator.print(f"\n{reason}: saved {saved}; resume with --resume_from_checkpoint latest")
                exit_code = 130
                break
    if clock.follows_time and clock.done and step < args.max_train_steps:
        accelerator.print(f"\nreached --max_train_minutes {args.max_train_minutes} at step {step}")
    bar.close()
    stop.restore()
    accelerator.wait_for_everyone()
    matmul_tflops_end = matmul_peak_tflops(accelerator.device, matmul_dtype)
    # DDP keeps replicas identical; a checksum per process shows it (a test checks it).
    checksum = sum(p.double().sum() for p in [*encoder.parameters(), *unet.parameters()])
    checksums = accelerator.gather(checksum.float()[None].to(accelerator.device)).tolist()
    if exit_code == 0 and accelerator.is_main_process:
        final = export_pipeline(accelerator, pipe, ema_models, encoder, unet, calibration_source)
        final.save_pretrained(output_dir)
        summary = {"train_steps": step, "train_seconds": round(train_seconds, 1), "data": data_path(args),
                   "preset": args.preset, "batch_size": args.train_batch_size, "processes": accelerator.num_processes,
                   "hardware": describe_hardware(accelerator), "thread_settings": THREAD_SETTINGS,
                   "parameter_checksums": checksums,
                   "first_step_at": first_step_at, "first_step_s": first_step_seconds,
                   # The machine's speed at both ends: steps and scores compare across runs beside it.
                   "matmul_dtype": str(matmul_dtype).removeprefix("torch."),
                   "matmul_tflops_start": round(matmul_tflops_start, 4), "matmul_tflops_end": round(matmul_tflops_end, 4),
                   "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        log = [json.loads(line) for line in log_path.read_text().splitlines()]
        if any("val_psnr" in row for row in log):
            plot_learning_curve(log, output_dir / LEARNING_CURVE)
        accelerator.print(f"saved the {'EMA ' if ema_models else ''}pipeline to {output_dir}")
        if args.push_to_hub:
            exit_code = push_pipeline(final, output_dir, args)
    if args.streaming:  # an open stream left to the interpreter's exit prints ignored exceptions
        for source in (train_source, calibration_source, val_source):
            source.close()
    # Ranks leave together, then end_training closes the process group: a gloo rank whose peer had
    # already exited (while rank 0 exported the pipeline) could hang at exit, seen in about 1 of 5 runs.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        # Leave now, while this frame still holds the models: freeing a DDP model's reducer (when main
        # returns, or in the interpreter's teardown) joins gloo's worker thread while holding the GIL, and
        # that thread may still be freeing a finished all-gather whose tensors need the GIL. A deadlock
        # at exit in about 1 of 3 two-process runs (py-spy: the main thread in ~ProcessGroupGloo).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    return exit_code


def describe_hardware(accelerator) -> str:
    """What the run trained on, for the model card: processes x device name."""
    if accelerator.device.type == "cuda":
        name = torch.cuda.get_device_name(accelerator.device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{accelerator.num_processes} x {name}"


@torch.no_grad()
def validation_loss(encoder, unet, noise_scheduler, batch, accelerator) -> float:
    """Loss on held-out objects with fixed timesteps and noise, so successive values compare."""
    encoder.eval()
    unet.eval()
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    with accelerator.autocast():
        generators = {"timesteps": torch.Generator().manual_seed(0), "noise": torch.Generator().manual_seed(1)}
        loss = diffusion_loss(encoder, unet, noise_scheduler, batch, generators)
    encoder.train()
    unet.train()
    return accelerator.gather(loss[None]).mean().item()


def export_pipeline(accelerator, pipe, ema_models, encoder, unet, calibration_source) -> SODANovelViewPipeline:
    """A standalone inference pipeline holding the EMA weights (or the raw ones without EMA)."""
    components = {}
    for name, model in (("encoder", encoder), ("unet", unet)):
        model = accelerator.unwrap_model(model, keep_torch_compile=False)
        copy = type(model).from_config(model.config).to(accelerator.device)
        copy.load_state_dict(model.state_dict())
        if name in ema_models:
            ema_models[name].copy_to(copy.parameters())
            calibration = (calibration_source.batch(i)["source_image"] for i in range(CALIBRATION_BATCHES))
            recalibrate_batch_norms(copy, calibration, accelerator.device)
        components[name] = copy.eval().cpu()
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return SODANovelViewPipeline(scheduler=scheduler, **components)


@torch.no_grad()
def recalibrate_batch_norms(model: torch.nn.Module, batches, device) -> None:
    """Recompute the batch-norm statistics of ``model`` (the encoder's ``latent_norm="batch"``) from
    ``batches`` of its input, and leave it in eval mode. EMA averages weights but not the statistics
    that go with them: the live model's statistics standardised the EMA encoder's latents wrongly
    (docs/results.md, "soda-tiny's shape")."""
    torch.optim.swa_utils.update_bn(batches, model, device)
    model.eval()


def validation_quality(accelerator, pipe, ema_models, encoder, unet, calibration_source, scorer, args, step,
                       output_dir) -> dict:
    """Score the pipeline as it would be exported now (EMA weights, recalibrated batch norms) on the
    scorer's fixed val pairs, with ``soda-nvs evaluate``'s metrics: its samples (DDIM,
    ``--validation_inference_steps``) as ``val_<metric>``, its one-step estimate as ``val_one_step_<metric>``.
    The samples go to ``samples/step-<step>.png`` (sources / targets / samples) and TensorBoard. Copying the
    source on the same pairs (``val_copy_source_<metric>``, scored once) comes with every row: the
    reference line of the curves."""
    if scorer is None:
        return {}
    preview = export_pipeline(accelerator, pipe, ema_models, encoder, unet, calibration_source).to(accelerator.device)
    preview.set_progress_bar_config(disable=True)
    samples = scorer.generate(preview, num_inference_steps=args.validation_inference_steps)
    one_step = scorer.generate(preview, num_inference_steps=1)
    logs = {}
    for prefix, scores in (("val", scorer.scores(samples)), ("val_one_step", scorer.scores(one_step)),
                           ("val_copy_source", scorer.copy_source_scores)):
        logs.update({f"{prefix}_{name}": value for name, value in scores.items()})
    grid = make_grid(torch.cat([scorer.sources, scorer.targets, samples]), columns=len(samples), scale=2)
    samples_dir = output_dir / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    grid.save(samples_dir / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("samples (source / target / generated)", np.asarray(grid), step, dataformats="HWC")
    return logs


def push_pipeline(pipe, output_dir: Path, args) -> int:
    """Upload the final pipeline with its card; a failed upload keeps the run (exit code 4)."""
    from soda_diffusers.hub import HubUploadError

    try:
        commit = pipe.push_to_hub(args.hub_model_id, private=args.hub_private or None, training_dir=output_dir)
    except HubUploadError as error:
        print(f"error: {error}\nThe trained pipeline is saved in {output_dir}; upload it later with "
              f"soda-nvs push --pipeline {output_dir} --repo-id {args.hub_model_id}")
        return 4
    print(f"uploaded to the Hub: {commit.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
