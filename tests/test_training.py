"""The training script: exact resume after a kill, NaN handling, two processes, the quickstart."""

import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from soda_diffusers import SODANovelViewPipeline, orbit_rays
from soda_diffusers.data import make_synthetic_nmr

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "training" / "train_soda.py"
TINY_MODEL_FLAGS = [
    "--encoder", json.dumps({"block_out_channels": [8, 16], "layers_per_block": 1, "latent_dim": 12,
                             "norm_num_groups": 4, "ray_fourier_features": 4}),
    "--unet", json.dumps({"block_out_channels": [8, 16], "layers_per_block": 1, "latent_dim": 12,
                          "norm_num_groups": 4, "ray_fourier_features": 4, "patch_size": 2}),
]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "nmr"
    make_synthetic_nmr(path, objects_per_category=3, seed=0, categories=["airplane", "car", "chair"])
    return path


def train_flags(data, output_dir, steps=6, **extra):
    flags = ["--config", "synthetic-tiny", "--data", str(data), "--output_dir", str(output_dir),
             "--max_train_steps", str(steps), "--train_batch_size", "4", "--checkpointing_steps", "2",
             "--validation_steps", "3", "--validation_objects", "2", "--validation_inference_steps", "2",
             "--lr_warmup_steps", "2", "--torch_threads", "1", "--report_to", "none", *TINY_MODEL_FLAGS]
    for key, value in extra.items():
        flags += [f"--{key}", str(value)]
    return flags


def load_script():
    spec = importlib.util.spec_from_file_location("train_soda_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def losses(output_dir):
    return [row["loss"] for row in log_rows(output_dir)]


@pytest.mark.slow
def test_a_killed_run_resumes_exactly(synthetic, tmp_path):
    train = load_script()
    assert train.main(train_flags(synthetic, tmp_path / "straight")) == 0

    # The interrupted and resumed runs read through two DataLoader workers: the same batches.
    interrupted = tmp_path / "interrupted"
    workers = {"dataloader_num_workers": 2}
    process = subprocess.Popen([sys.executable, str(SCRIPT), *train_flags(synthetic, interrupted, **workers)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (interrupted / "checkpoint-2").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=240)[0]
    assert process.returncode in (0, 130), output
    if process.returncode == 130:
        assert "SIGTERM on process 0: saved" in output
        assert not (interrupted / "model_index.json").exists()

    assert train.main(train_flags(synthetic, interrupted, resume_from_checkpoint="latest", **workers)) == 0
    assert losses(interrupted) == losses(tmp_path / "straight")
    log = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    assert all(record["grad_norm"] > 0 for record in log)  # logged before clipping, every step
    for component in ("encoder", "unet"):
        a = load_file(tmp_path / "straight" / component / "diffusion_pytorch_model.safetensors")
        b = load_file(interrupted / component / "diffusion_pytorch_model.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)
    # Only the last two checkpoints are kept, and no half-written one is left behind.
    names = sorted(p.name for p in interrupted.iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-4", "checkpoint-6"]
    pipe = SODANovelViewPipeline.from_pretrained(interrupted)
    assert pipe.unet.config.patch_size == 2


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(synthetic, tmp_path, capsys):
    train = load_script()
    original = train.diffusion_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = original(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    train.diffusion_loss = poisoned
    assert train.main(train_flags(synthetic, tmp_path)) == 3
    message = capsys.readouterr().out
    assert "at step 2" in message and "checkpoint-2" in message
    assert (tmp_path / "checkpoint-2" / "step.json").is_file()
    assert not (tmp_path / "model_index.json").exists()


def test_ema_encoder_gets_batch_norm_statistics_of_its_own_weights():
    from conftest import TINY_ENCODER, randomize_

    from soda_diffusers import SODAEncoder

    train = load_script()
    encoder = randomize_(SODAEncoder(**TINY_ENCODER, latent_norm="batch"), 3)
    encoder.latent_batch_norm.running_mean.fill_(5.0)  # statistics of other weights
    batches = [torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1 for i in range(3)]
    train.recalibrate_batch_norms(encoder, batches, "cpu")
    assert not encoder.training and encoder.latent_batch_norm.momentum == 0.1
    raw = []  # the latents before the norm
    hook = encoder.proj_out.register_forward_hook(lambda module, inputs, output: raw.append(output))
    with torch.no_grad():
        z = torch.cat([encoder(b) for b in batches])
    hook.remove()
    raw = torch.cat(raw)
    torch.testing.assert_close(encoder.latent_batch_norm.running_mean, raw.mean(0), atol=1e-5, rtol=1e-5)
    assert z.mean(0).abs().max() < 1e-4


def test_bad_flags_and_missing_checkpoints_are_reported(synthetic, tmp_path):
    train = load_script()
    with pytest.raises(FileNotFoundError, match="no-such-config"):
        train.parse_args(["--config", "no-such-config"])
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        train.main(train_flags(synthetic, tmp_path, resume_from_checkpoint=tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="--streaming needs --data"):
        train.main(train_flags("", tmp_path, streaming="true"))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_clean_image_loss_weighting_is_the_error_of_the_implied_clean_image(prediction_type):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from soda_diffusers.schedules import scheduler_config

    train = load_script()
    config = scheduler_config("cosine")
    scheduler = DDPMScheduler(beta_schedule=config["beta_schedule"], trained_betas=config["trained_betas"],
                              prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    clean, noise, prediction = (torch.randn(8, 3, 4, 4, generator=generator) for _ in range(3))
    timesteps = torch.tensor([0, 10, 100, 300, 500, 700, 900, 999])
    noisy = scheduler.add_noise(clean, noise, timesteps)
    alpha = scheduler.alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[timesteps]).sqrt().view(-1, 1, 1, 1)
    implied_clean = {"epsilon": (noisy - sigma * prediction) / alpha, "v_prediction": alpha * noisy - sigma * prediction,
                     "sample": prediction}[prediction_type]
    target = train.training_target(scheduler, clean, noise, timesteps)
    error = (prediction - target).square().mean(dim=(1, 2, 3))
    weights = train.loss_weights(scheduler, timesteps, "clean_image")
    weighted = error if weights is None else error * weights
    torch.testing.assert_close(weighted, (implied_clean - clean).square().mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5)
    assert train.loss_weights(scheduler, timesteps, "none") is None
    # Min-SNR-gamma: the same clean-image error, weighted by min(SNR, gamma), with or without clean_image.
    min_snr = (implied_clean - clean).square().mean(dim=(1, 2, 3)) * compute_snr(scheduler, timesteps).clamp(max=5.0)
    for weighting in ("none", "clean_image"):
        torch.testing.assert_close(error * train.loss_weights(scheduler, timesteps, weighting, snr_gamma=5.0), min_snr,
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="--loss_weighting: expected one of"):
        train.loss_weights(scheduler, timesteps, "snr")


def test_conditioning_dropout_draws_from_its_own_generator_and_drops_chunks_whole():
    train = load_script()
    z = torch.ones(4000, 12)

    def dropped(seed, **probs):
        return train.drop_conditioning(z, torch.Generator().manual_seed(seed), chunk_sizes=[4, 4, 4], **probs)

    masked = dropped(0, z_drop_prob=0.5, layer_mask_prob=0.5)
    # P(all dropped) = 0.5 + 0.5 * 0.5^3; P(entry dropped) = 0.5 + 0.5 * 0.5.
    assert (masked == 0).all(dim=1).float().mean() == pytest.approx(0.5625, abs=0.03)
    assert (masked == 0).float().mean() == pytest.approx(0.75, abs=0.03)
    for chunk in masked.split(4, dim=1):
        assert ((chunk == 0).all(1) | (chunk == 1).all(1)).all()
    torch.testing.assert_close(dropped(0, z_drop_prob=0.5, layer_mask_prob=0.5), masked)
    assert not torch.equal(dropped(1, z_drop_prob=0.5, layer_mask_prob=0.5), masked)
    state = torch.random.get_rng_state()
    whole = dropped(0, z_drop_prob=0.3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream is untouched
    assert ((whole == 0).all(1) | (whole == 1).all(1)).all() and (whole == 0).all(1).float().mean() == pytest.approx(0.3, abs=0.03)


def test_input_perturbation_noises_the_input_more_than_the_target_says():
    from diffusers import DDPMScheduler

    train = load_script()
    scheduler = DDPMScheduler(prediction_type="epsilon")
    seen = {}

    def unet(noisy, timesteps, rays, z):
        seen["noisy"] = noisy
        return SimpleNamespace(sample=torch.zeros_like(noisy))

    batch = {"target_image": torch.rand(4, 3, 8, 8) * 2 - 1, "source_image": torch.zeros(4, 1, 3, 8, 8),
             "target_rays": torch.zeros(4, 6, 8, 8)}

    def loss(perturbation):
        generators = {"timesteps": torch.Generator().manual_seed(0), "noise": torch.Generator().manual_seed(1)}
        return train.diffusion_loss(lambda image, rays: torch.zeros(4, 2), unet, scheduler, batch, generators,
                                    input_perturbation=perturbation)

    timesteps = torch.randint(1000, (4,), generator=torch.Generator().manual_seed(0))
    draws = torch.Generator().manual_seed(1)
    noise, extra = torch.randn(4, 3, 8, 8, generator=draws), torch.randn(4, 3, 8, 8, generator=draws)
    # The target stays the noise drawn first: a zero prediction's loss is its mean square either way.
    torch.testing.assert_close(loss(0.1), noise.square().mean())
    torch.testing.assert_close(seen["noisy"], scheduler.add_noise(batch["target_image"], noise + 0.1 * extra, timesteps))
    loss(0.0)
    torch.testing.assert_close(seen["noisy"], scheduler.add_noise(batch["target_image"], noise, timesteps))


def test_schedule_flags_reach_the_saved_pipeline(synthetic, tmp_path):
    # The sampler exported with the model must use the noise schedule and prediction type it was trained with.
    from soda_diffusers.schedules import schedule_name

    train = load_script()
    flags = train_flags(synthetic, tmp_path, steps=2, prediction_type="epsilon", noise_schedule="inverted_cosine")
    assert train.main(flags) == 0
    config = SODANovelViewPipeline.from_pretrained(tmp_path).scheduler.config
    assert config.prediction_type == "epsilon" and schedule_name(config) == "inverted_cosine"
    # v-prediction with either loss weighting trains, and the saved pipeline samples with it.
    for weighting in ("none", "clean_image"):
        out = tmp_path / f"v-{weighting}"
        assert train.main(train_flags(synthetic, out, steps=2, prediction_type="v_prediction", loss_weighting=weighting)) == 0
        pipe = SODANovelViewPipeline.from_pretrained(out)
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        images = pipe(torch.zeros(3, 32, 32), orbit_rays([15.0], size=32), num_inference_steps=2, output_type="pt").images
        assert torch.isfinite(images).all()
    with pytest.raises(ValueError, match="schedule: expected one of"):
        train.main(train_flags(synthetic, tmp_path / "bad", noise_schedule="sigmoid"))
    # The conditioning dropout and input perturbation are training flags: recorded with the run, not in the model.
    out = tmp_path / "perturbed"
    assert train.main(train_flags(synthetic, out, steps=2, input_perturbation=0.1, z_drop_prob=0.2, layer_mask_prob=0.3)) == 0
    recorded = json.loads((out / "train_config.json").read_text())
    assert (recorded["input_perturbation"], recorded["z_drop_prob"], recorded["layer_mask_prob"]) == (0.1, 0.2, 0.3)
    pipe = SODANovelViewPipeline.from_pretrained(out)
    assert "z_drop_prob" not in pipe.unet.config
    assert torch.isfinite(pipe(torch.zeros(3, 32, 32), orbit_rays([15.0], size=32), num_inference_steps=2,
                               output_type="pt").images).all()
    for flag, value in (("z_drop_prob", 1.0), ("layer_mask_prob", -0.1), ("input_perturbation", -1)):
        with pytest.raises(ValueError, match=f"--{flag}: expected"):
            train.main(train_flags(synthetic, tmp_path / "bad", **{flag: value}))


def log_rows(output_dir):
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def slowed(train, seconds_per_step: float, signal_at_call: int | None = None):
    """Make every training step of ``train`` take at least ``seconds_per_step`` longer; with
    ``signal_at_call``, send this process a SIGTERM during that call (as a kill would)."""
    original, calls = train.diffusion_loss, []

    def slow_loss(*args, **kwargs):
        calls.append(1)
        if torch.is_grad_enabled():  # training steps, not the validation loss
            time.sleep(seconds_per_step)
        if len(calls) == signal_at_call:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    train.diffusion_loss = slow_loss


def test_a_time_budgeted_run_anneals_its_learning_rate_however_slow_the_steps(synthetic, tmp_path):
    # A cap of 1,000 steps that the clock reaches long before: the schedule still ends at its final value.
    train = load_script()
    slowed(train, 0.25)
    flags = train_flags(synthetic, tmp_path, steps=1000, max_train_minutes=0.08, validation_steps=1000,
                        checkpointing_steps=1000, lr_warmup_steps=20)
    assert train.main(flags) == 0
    log = log_rows(tmp_path)
    assert 5 <= len(log) < 100 and log[-1]["elapsed_s"] >= 0.08 * 60
    lrs = [row["lr"] for row in log]
    assert lrs[-1] == 0.0 and max(lrs) > 1e-3  # warmed up (20 of 1,000 steps: 2% of the time), then annealed
    peak = lrs.index(max(lrs))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["train_steps"] == len(log)
    assert summary["matmul_dtype"] == "float32" and summary["matmul_tflops_start"] > 0 and summary["matmul_tflops_end"] > 0
    # OpenMP's waiting, as this process got it (torch came first here, so nothing was chosen).
    assert summary["thread_settings"]["source"]


def test_a_resumed_time_budgeted_run_continues_at_its_saved_fraction(synthetic, tmp_path):
    train = load_script()
    slowed(train, 0.2, signal_at_call=6)
    flags = train_flags(synthetic, tmp_path, steps=1000, max_train_minutes=0.1, validation_steps=1000,
                        checkpointing_steps=1000)
    assert train.main(flags) == 130
    saved = json.loads((tmp_path / "checkpoint-6" / "step.json").read_text())
    assert saved["step"] == 6 and 6 * 0.2 <= saved["train_seconds"] < 0.1 * 60
    before = log_rows(tmp_path)

    train = load_script()
    slowed(train, 0.2)
    assert train.main(train_flags(synthetic, tmp_path, steps=1000, max_train_minutes=0.1, validation_steps=1000,
                                  checkpointing_steps=1000, resume_from_checkpoint="latest")) == 0
    after = log_rows(tmp_path)[len(before):]
    assert after[0]["step"] == 7 and after[0]["elapsed_s"] > saved["train_seconds"]
    assert after[0]["lr"] < before[-1]["lr"]  # the decay goes on where it was, no new warm-up
    assert after[-1]["lr"] == 0.0 and 0.1 * 60 <= after[-1]["elapsed_s"] < 0.1 * 60 + 5


def test_the_logged_quality_equals_evaluate_on_the_same_pairs_and_the_curve_is_drawn(synthetic, tmp_path):
    from soda_diffusers.evaluation.runner import PairScorer, evaluate

    train = load_script()
    assert train.main(train_flags(synthetic, tmp_path / "run", steps=3, validation_objects=2,
                                  validation_views=3, validation_inference_steps=2)) == 0
    last = log_rows(tmp_path / "run")[-1]
    assert (tmp_path / "run" / "learning_curve.png").is_file()
    assert (tmp_path / "run" / "samples" / "step-000003.png").is_file()

    pipe = SODANovelViewPipeline.from_pretrained(tmp_path / "run")
    nvs = evaluate(pipe, synthetic, tmp_path / "evaluate", split="val", limit=2, num_inference_steps=2,
                   baselines=("copy_source",), progress=False)["nvs"]
    records = {json.loads(line)["object_id"]: json.loads(line)
               for line in (tmp_path / "evaluate" / "nvs_objects.jsonl").read_text().splitlines()}
    pairs = PairScorer.from_data(synthetic, "val", 32, 2, 3).pairs
    assert len(pairs) == 6 and len({object_id for object_id, _, _ in pairs}) == 2
    for metric in ("psnr", "ssim", "fg_iou", "fg_color_error", "fg_brightness_error", "fg_chroma_error"):
        for prefix, scores_of in (("val", lambda r: r), ("val_copy_source", lambda r: r["baselines"]["copy_source"])):
            values = []
            for object_id, source_view, view in pairs:
                record = records[object_id]
                assert record["source_view"] == source_view
                values.append(scores_of(record)[metric][record["target_views"].index(view)])
            assert last[f"{prefix}_{metric}"] == pytest.approx(sum(values) / len(values), rel=1e-5, abs=1e-5), (prefix, metric)
    assert {"val_one_step_psnr", "validation_s", "val_loss"} <= set(last)
    assert nvs["baselines"]["copy_source"]["fg_brightness_error"] >= 0


def test_timestep_bias_weights_and_draws():
    train = load_script()
    def flags(**values):
        return train.parse_args([f"--{k}={v}" for k, v in values.items()])

    assert train.timestep_weights(flags(), 1000) is None
    weights = train.timestep_weights(flags(timestep_bias_strategy="later", timestep_bias_multiplier=3,
                                           timestep_bias_portion=0.5), 1000)
    assert weights.sum().item() == pytest.approx(1.0)
    assert weights[500:].sum().item() == pytest.approx(0.75)
    assert weights[:500].unique().numel() == 1 and weights[500:].unique().numel() == 1
    in_range = train.timestep_weights(flags(timestep_bias_strategy="range", timestep_bias_begin=100,
                                            timestep_bias_end=200, timestep_bias_multiplier=10), 1000)
    assert in_range[100:200].sum().item() == pytest.approx(1000 / 1900)
    # The draws follow the weights: three quarters land in the biased half.
    generator = torch.Generator().manual_seed(0)
    draws = torch.multinomial(weights, 20000, replacement=True, generator=generator)
    assert 0.73 < (draws >= 500).float().mean().item() < 0.77
    for bad, match in [(dict(timestep_bias_strategy="latest"), "strategy"),
                       (dict(timestep_bias_strategy="later", timestep_bias_portion=0), "portion"),
                       (dict(timestep_bias_strategy="later", timestep_bias_multiplier=0), "multiplier"),
                       (dict(timestep_bias_strategy="range", timestep_bias_begin=500, timestep_bias_end=400), "begin")]:
        with pytest.raises(ValueError, match=match):
            train.timestep_weights(flags(**bad), 1000)


@pytest.mark.slow
def test_two_processes_stay_in_sync_and_only_rank_zero_writes(synthetic, tmp_path):
    # torchrun starts the two CPU processes (gloo); Accelerate picks the distributed setup up from it.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), str(SCRIPT),
               *train_flags(synthetic, tmp_path, steps=3)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["processes"] == 2
    first, second = summary["parameter_checksums"]
    assert first == pytest.approx(second, rel=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def launch_ranks(flags, world_size=2):
    """The training script in ``world_size`` CPU processes (gloo), started directly rather than by torchrun,
    so that a test can signal one rank and read each one's exit code."""
    port = str(free_port())
    processes = []
    for rank in range(world_size):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "WORLD_SIZE": str(world_size), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world_size)}
        processes.append(subprocess.Popen([sys.executable, str(SCRIPT), *flags], env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return processes


def finish(processes, timeout=60):
    try:
        outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    except subprocess.TimeoutExpired:
        for process in processes:  # no hung rank left behind to slow the rest of the suite
            process.kill()
        tails = [process.communicate()[0][-2000:] for process in processes]
        pytest.fail(f"the ranks did not exit within {timeout} s: {tails}")
    return [process.returncode for process in processes], outputs


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_the_same_step_and_the_run_resumes_exactly(synthetic, tmp_path):
    flags = dict(steps=40, checkpointing_steps=1000, validation_steps=1000)
    codes, outputs = finish(launch_ranks(train_flags(synthetic, tmp_path / "straight", **flags)))
    assert codes == [0, 0], outputs

    run = tmp_path / "interrupted"
    processes = launch_ranks(train_flags(synthetic, run, **flags))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and all(p.poll() is None for p in processes):
        if (run / "train_log.jsonl").is_file() and len((run / "train_log.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)  # rank 1 only
    codes, outputs = finish(processes)
    assert codes == [130, 130], outputs
    assert "SIGTERM on process 1: saved" in outputs[0]
    checkpoints = [p.name for p in run.iterdir() if p.name.startswith("checkpoint-")]
    assert len(checkpoints) == 1, checkpoints
    stopped_at = int(checkpoints[0].split("-")[1])
    assert 3 <= stopped_at < 40
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()][-1] == stopped_at
    assert not (run / "model_index.json").exists()

    codes, outputs = finish(launch_ranks(train_flags(synthetic, run, resume_from_checkpoint="latest", **flags)))
    assert codes == [0, 0], outputs
    assert losses(run) == losses(tmp_path / "straight")


def test_several_source_views_train_and_the_saved_pipeline_takes_them(synthetic, tmp_path):
    train = load_script()
    assert train.main(train_flags(synthetic, tmp_path, steps=2, num_source_views=3)) == 0
    pipe = SODANovelViewPipeline.from_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    source = train.batch_source(train.parse_args(["--data", str(synthetic), "--num_source_views", "3"]), "test", 32,
                                batch_size=2, seed=0)
    batch = source.batch(0)
    assert batch["source_image"].shape == (2, 3, 3, 32, 32)
    images = pipe(batch["source_image"], batch["target_rays"], source_rays=batch["source_rays"], num_inference_steps=2,
                  output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_streaming_from_local_parquet_trains_and_resumes_from_the_stored_stream_position(synthetic, tmp_path):
    # The --streaming path of a Hub dataset id, offline: a local folder in the layout push_dataset_to_hub writes.
    import datasets

    from soda_diffusers.data import convert_to_arrow

    for split, dataset in datasets.load_from_disk(str(convert_to_arrow(synthetic, tmp_path / "arrow", 32))).items():
        dataset.to_parquet(str(tmp_path / "parquet" / "data" / f"{split}-00000-of-00001.parquet"))
    train = load_script()
    parquet = tmp_path / "parquet"
    flags = dict(steps=6, streaming="true", shuffle_buffer=0)
    assert train.main(train_flags(parquet, tmp_path / "straight", **flags)) == 0

    original, calls = train.diffusion_loss, []

    # Stopped after step 2, the stream has read 8 objects of 3: a resume that lost the position would
    # start over at the first object, and draw other batches.
    def stop_after_the_second_step(*args, **kwargs):  # as if a SIGTERM came during step 2
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    train.diffusion_loss = stop_after_the_second_step
    run = tmp_path / "interrupted"
    assert train.main(train_flags(parquet, run, **{**flags, "checkpointing_steps": 100})) == 130
    train.diffusion_loss = original
    assert (run / "checkpoint-2" / "stream_state_0.json").is_file()
    assert train.main(train_flags(parquet, run, resume_from_checkpoint="latest", **flags)) == 0
    assert losses(run) == losses(tmp_path / "straight")


def test_speed_flags_train_compiled_and_save_a_pipeline_that_loads(synthetic, tmp_path):
    # The GPU speed options run on the CPU too: compiled (inductor) models, channels-last, fused AdamW and
    # a forced attention backend; the compilation is timed on its own (the first step).
    train = load_script()
    flags = dict(steps=2, torch_compile="true", channels_last="true", fused_adamw="true", attention_backend="math",
                 allow_tf32="true")
    assert train.main(train_flags(synthetic, tmp_path, **flags)) == 0
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["first_step_s"] > 0
    assert all(loss == loss for loss in losses(tmp_path))
    pipe = SODANovelViewPipeline.from_pretrained(tmp_path)  # plain weights, no compiled-module prefixes
    assert not any(key.startswith("_orig_mod") for key in pipe.unet.state_dict())
    with pytest.raises(ValueError, match="attention_backend"):
        train.main(train_flags(synthetic, tmp_path / "bad", attention_backend="fast"))


def test_push_to_hub_flag_uploads_the_run_and_a_failed_upload_keeps_it(synthetic, tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import OfflineModeIsEnabled

    train = load_script()
    uploads = []

    def upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        uploads.append({p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()})
        if len(uploads) == 2:
            raise OfflineModeIsEnabled("Cannot reach https://huggingface.co")
        return SimpleNamespace(commit_url="https://huggingface.co/someone/tiny/commit/1")

    monkeypatch.setattr("soda_diffusers.hub.create_repo", lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr("soda_diffusers.hub.upload_folder", upload_folder)
    with pytest.raises(ValueError, match="hub_model_id"):
        train.main(train_flags(synthetic, tmp_path / "no-id", steps=2, push_to_hub="true"))
    assert not (tmp_path / "no-id").exists()

    flags = dict(steps=2, push_to_hub="true", hub_model_id="someone/tiny")
    assert train.main(train_flags(synthetic, tmp_path / "run", **flags)) == 0
    assert {"README.md", "model_index.json", "train_summary.json", "unet/diffusion_pytorch_model.safetensors"} <= uploads[0]
    assert "uploaded to the Hub" in capsys.readouterr().out

    assert train.main(train_flags(synthetic, tmp_path / "offline", **flags)) == 4
    assert "soda-nvs push --pipeline" in capsys.readouterr().out
    assert (tmp_path / "offline" / "model_index.json").is_file()


@pytest.mark.slow
def test_quickstart_writes_the_report_files_and_evaluate_reproduces_its_numbers(synthetic, tmp_path):
    from soda_diffusers.cli import main

    out = tmp_path / "quickstart"
    extra = shlex.join(train_flags(synthetic, out / "train", steps=3)[4:])
    code = main(["quickstart", "--out", str(out), "--steps", "3", "--data", str(synthetic), "--objects", "2",
                 "--train-args", extra])
    assert code == 0
    result = json.loads((out / "quickstart.json").read_text())
    assert set(result) >= {"model", "copy_source", "mean_image", "other_source", "one_step", "objects", "train_steps",
                           "train_seconds", "evaluate_command"}
    assert result["objects"] == 2 and result["train_steps"] == 3
    for key in ("model", "copy_source", "mean_image", "other_source", "one_step"):
        assert 0 < result[key]["psnr"] < 100 and -1 <= result[key]["ssim"] <= 1
        assert 0 <= result[key]["fg_iou"] <= 1 and 0 <= result[key]["fg_color_error"] <= 442
    assert (out / "loss.png").is_file() and (out / "report.md").is_file()
    report = (out / "report.md").read_text()
    assert f"matmul ran at {result['matmul_tflops'][0]:.2f} TFLOP/s" in report
    assert result["thread_settings"]["source"] and "OpenMP's waiting" in report
    assert 0 <= result["model"]["light_grey"] <= 100 and "light grey (x targets')" in report
    assert len(list((out / "samples").glob("*-orbit.gif"))) == 2
    assert SODANovelViewPipeline.from_pretrained(out / "pipeline").unet.config.sample_size == 32

    # One protocol: the evaluation command the report names gives the very same numbers.
    command = shlex.split(result["evaluate_command"])[1:] + ["--out", str(tmp_path / "evaluate")]
    assert main(command) == 0
    nvs = json.loads((tmp_path / "evaluate" / "metrics.json").read_text())["nvs"]
    scores = {"model": nvs, **nvs["baselines"]}
    for method in ("model", "copy_source", "mean_image", "other_source"):
        for metric, value in result[method].items():
            assert scores[method][metric] == value, (method, metric)
    # The source views are the data's own list, as written with the synthetic data.
    records = [json.loads(line) for line in (tmp_path / "evaluate" / "nvs_objects.jsonl").read_text().splitlines()]
    stored = {f"{c}/{o}": int(v) for c, o, v in (line.split() for line in (synthetic / "source_views.txt").read_text().splitlines())}
    assert all(record["source_view"] == stored[record["object_id"]] for record in records)
