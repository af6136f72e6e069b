#!/usr/bin/env python
"""The GPU presets checked on a CUDA machine, run from the repository root (docs/gpu_check.md: what to carry,
the commands and the expected time of each stage):

    python3 benchmarks/gpu_check.py --stage 1   # stage 0; tests/test_gpu.py; nmr-32: bench, train, evaluate
    python3 benchmarks/gpu_check.py --stage 2   # stage 0; nmr-64: bench, train, evaluate; the summary of both

**Stage 0** (seconds) comes first in every command: the log is opened, the carried wheels are installed (pip's
output in the log), every module the later stages import is imported, and the CUDA device, bf16 and the free
disk are checked; ``summary.md`` says what was found, and a failure stops the command there.

Then each stage: the synthetic data (13 categories x ``--objects-per-category``) is rendered and its view stores
built in a background process while the tests run, and waited for before the bench, so the timed rows run on
quiet cores: ``bench_models.py --device cuda --precision bf16 --options none channels_last tf32 fused compile
all`` (samples/s, % of the bf16 matmul peak, peak memory, DDIM-50 images/s; at most ``--bench-minutes``);
then ``training/train_soda.py --config nmr-32`` (``nmr-64``) for ``--minutes`` with the bench option that
trains the most samples in them, its EMA decay fitted to the steps the bench predicts (a decay averages over
about ``1 / (1 - decay)`` steps; a longer window than the run exports mostly the initial weights); then
``soda-nvs evaluate --type nvs --split val`` with its baselines on ``--eval-objects`` val objects at DDIM-50.
Every child has a timeout taken from the stage's time left (``--stage-minutes``; the training's is its
minutes plus ``--train-grace``), and where the stage would run longer the bench is stopped and the
training shortened (both said in the log and the summary). ``--stage all`` runs both stages in one command.

**Published as it goes.** After stage 0, the tests, each bench row, each training run and each evaluation,
the out folder (``--out``: ``$OUT`` when set, else ``gpu_check_out/``) is written again: ``summary.md``
(stage 0, tests, the bench tables, both runs and their evaluations side by side, the commands),
``metrics-nmr-32.json`` and ``metrics-nmr-64.json`` (``soda-nvs evaluate``'s), ``sheet.png`` (learning
curves and val samples), ``gpu_check.tar.gz`` (the rest: the bench JSON, each run's ``metrics.md`` and
plots, ``train_log.jsonl``, ``train_summary.json``, the logs) and ``log.txt`` (this command's output). So a
command stopped part-way, even killed, leaves what finished. Stage 2's summary shows stage 1's run from the
work folder; where that is gone (a fresh machine), pass ``--previous`` stage 1's ``gpu_check.tar.gz``. ``--stage
summary`` only writes the out folder again from the results.

The machine needs python3 with torch, accelerate, safetensors, huggingface_hub, torchmetrics and the
package's other needs but those in ``--wheels``: ``--fetch-wheels``, on a machine with pip and a registry,
downloads the pure-Python wheels of :data:`WHEELS` at the versions installed there, for ``--python-version``,
into ``.whl/`` (git-ignored); take that folder along, and stage 0 installs those the machine lacks with ``pip
install --no-index --no-deps --target`` into the work folder. The package itself runs from this checkout,
the repository root on ``PYTHONPATH``.

``--dry-run`` runs the same stages on CPU at tiny sizes (2 categories x 3 objects, soda-tiny made tinier at
the presets' resolutions, 20 s of training per run, 5 sampling steps): ``tests/test_gpu_check.py`` runs it,
and simulates a wheel that fails, a child that hangs and a command killed part-way.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {1: "nmr-32", 2: "nmr-64"}  # stage -> training config of training/configs
OPTION_FLAGS = {"none": [], "channels_last": ["--channels_last"], "tf32": ["--allow_tf32"],
                "fused": ["--fused_adamw"], "compile": ["--torch_compile"]}
OPTION_FLAGS["all"] = [flag for flags in OPTION_FLAGS.values() for flag in flags]
# Pure-Python distributions the GPU image lacks: diffusers and datasets, and those of their needs it lacks too.
WHEELS = ("diffusers", "importlib_metadata", "lazy-importer", "datasets", "dill", "multiprocess")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
METRICS = (("psnr", "PSNR (dB)", 2), ("ssim", "SSIM", 3), ("fg_iou", "FG IoU", 3),
           ("fg_color_error", "FG colour error", 1))
RESERVE_S = 90  # a stage's time after training: the run's start-up and export, the evaluation, the summary
# Modules the stages import, checked by stage 0 so that a missing one stops the command in seconds.
STAGE0_MODULES = ("torch", "numpy", "PIL", "yaml", "safetensors", "accelerate", "diffusers", "datasets", "torchmetrics",
                  "huggingface_hub", "soda_diffusers.models", "soda_diffusers.pipeline_soda_novel_view",
                  "soda_diffusers.data", "soda_diffusers.evaluation.runner", "soda_diffusers.visualize")
TINY = {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_dim": 12, "norm_num_groups": 4,
        "ray_fourier_features": 4}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="all", choices=("1", "2", "all", "summary"),
                        help="1: tests and nmr-32; 2: nmr-64 and the summary of both; all: both (default)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="training minutes per run (default 2.5; --dry-run: 1/3)")
    parser.add_argument("--stage-minutes", type=float, default=6.0,
                        help="train less when a stage would take longer than this (default 6; not in --dry-run)")
    parser.add_argument("--bench-minutes", type=float, default=2.0, help="at most this long per bench (default 2)")
    parser.add_argument("--tests-minutes", type=float, default=3.0, help="at most this long for the tests (default 3)")
    parser.add_argument("--train-grace", type=float, default=120.0,
                        help="seconds a training run may take beyond its minutes (start-up, export; default 120)")
    parser.add_argument("--min-free-gib", type=float, default=20.0,
                        help="stage 0 fails with less free disk in --work (default 20; --dry-run: 0.5)")
    parser.add_argument("--python-version", default="3.12", help="--fetch-wheels: the device's Python (default 3.12)")
    parser.add_argument("--eval-objects", type=int, default=39, help="val objects evaluated per run (default 39)")
    parser.add_argument("--objects-per-category", type=int, default=300, help="synthetic objects per category")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out",
                        help="output folder (default $OUT, else gpu_check_out)")
    parser.add_argument("--work", default=str(REPO / ".gpu_check"),
                        help="data, view stores, runs and results, kept for the next stage (default .gpu_check)")
    parser.add_argument("--wheels", default=str(REPO / ".whl"), help="folder of wheels to install if missing")
    parser.add_argument("--previous", nargs="*", default=[],
                        help="gpu_check.tar.gz of an earlier stage (or its folder): its results join the summary")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, 20 s of training per run")
    parser.add_argument("--fetch-wheels", action="store_true",
                        help="download the wheels the GPU machine lacks into --wheels, and stop")
    parser.add_argument("--prepare-data", nargs="+", type=int, metavar="SIZE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.minutes is None:
        args.minutes = 1 / 3 if args.dry_run else 2.5
    if args.dry_run:
        args.stage_minutes = float("inf")
        args.min_free_gib = min(args.min_free_gib, 0.5)
        args.objects_per_category = min(args.objects_per_category, 3)
        args.eval_objects = min(args.eval_objects, 2)
    return args


class Check:
    """One invocation: its folders, the running data job, and the log (this process's output and its
    children's, also written to ``out/log.txt``)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry = args.dry_run
        self.work, self.out = Path(args.work).resolve(), Path(args.out).resolve()
        self.results = self.work / "results"
        self.categories = ["airplane", "car"] if self.dry else None
        name = f"synthetic-{args.objects_per_category}x{len(self.categories) if self.dry else 13}"
        self.data = self.work / "data" / name
        self.data_job = None
        self.failures = []

    # -------------------------------------------------------------------------------------- running

    def say(self, text: str) -> None:
        print(f"[gpu_check {time.strftime('%H:%M:%S')}] {text}", flush=True)

    def run(self, command: list[str], title: str, timeout: float | None = None) -> tuple[int, str]:
        """Run ``command`` from the repository root, its output passed through (and logged), stopped with
        its children after ``timeout`` seconds; returns the exit code and the last 4,000 characters of output."""
        self.say(f"{title}: {shlex.join(command)}" + (f" (at most {timeout:.0f} s)" if timeout else ""))
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        timer = threading.Timer(timeout or 0, os.killpg, (process.pid, signal.SIGKILL))
        if timeout:
            timer.start()
        tail = ""
        while chunk := process.stdout.read1(65536):
            text = chunk.decode(errors="replace")
            sys.stdout.write(text)
            sys.stdout.flush()
            tail = (tail + text)[-4000:]
        code = process.wait()
        timer.cancel()
        stopped = " (stopped: out of time)" if timeout and time.monotonic() - start >= timeout else ""
        self.say(f"{title}: exit code {code} after {time.monotonic() - start:.0f} s{stopped}")
        if code:
            self.failures.append(f"{title} (exit code {code}{stopped})")
        return code, tail

    # ----------------------------------------------------------------------------------------- data

    def marker(self, size: int) -> Path:
        return self.data.parent / f"{self.data.name}.stores-{size}px.done"

    def start_data(self) -> None:
        """Render the synthetic data and build its view stores at both runs' sizes, in a process of its own
        (lower priority, all but two cores), unless they are there already."""
        sizes = [32, 64]
        if self.data_job is None and not all(self.marker(size).exists() for size in sizes):
            log = self.data.parent / "prepare.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, __file__, "--prepare-data", *map(str, sizes), "--work", str(self.work),
                       "--objects-per-category", str(self.args.objects_per_category)]
            self.say(f"data: {self.data.name} and its view stores, in the background (log: {log})")
            self.data_job = subprocess.Popen(command + (["--dry-run"] if self.dry else []), cwd=REPO,
                                             stdout=log.open("w"), stderr=subprocess.STDOUT)

    def wait_data(self, size: int, timeout: float | None = None) -> None:
        start = time.monotonic()
        while not self.marker(size).exists():
            if self.data_job is None or self.data_job.poll() is not None:
                log = (self.data.parent / "prepare.log").read_text()[-3000:]
                raise RuntimeError(f"the data job stopped before the {size} px stores were built:\n{log}")
            if timeout and time.monotonic() - start > timeout:
                raise RuntimeError(f"the {size} px stores were not built after {timeout:.0f} s (log: "
                                   f"{self.data.parent / 'prepare.log'})")
            time.sleep(1)
        self.say(f"data: {size} px stores ready (waited {time.monotonic() - start:.0f} s for them)")

    def finish_data(self) -> None:
        """Let the data job finish (a command's leftover processes are killed when it returns)."""
        if self.data_job is not None:
            self.data_job.wait()
            self.data_job = None

    def stop_data(self) -> None:
        """Stop a data job still running (the command was stopped part-way)."""
        if self.data_job is not None and self.data_job.poll() is None:
            self.data_job.kill()
            self.data_job.wait()
        self.data_job = None


def prepare_data(check: Check, sizes: list[int]) -> None:
    """The data job: render the objects (all but two cores), then build the train and val stores of every
    size at once, each in a process, and mark each size done."""
    from concurrent.futures import ProcessPoolExecutor

    from soda_diffusers.data import make_synthetic_nmr

    os.nice(5)
    cores = os.cpu_count() or 1
    start = time.monotonic()
    if not check.data.is_dir():
        make_synthetic_nmr(check.data, check.args.objects_per_category, seed=0, categories=check.categories,
                           num_workers=0 if check.dry else max(1, cores - 2))
    print(f"rendered {check.data} in {time.monotonic() - start:.0f} s", flush=True)
    jobs = [(size, split) for size in sizes for split in ("train", "val")]
    with ProcessPoolExecutor(len(jobs)) as pool:
        futures = {job: pool.submit(open_store, str(check.data), job[1], job[0]) for job in jobs}
        for size in sizes:
            for split in ("train", "val"):
                futures[size, split].result()
            check.marker(size).touch()
            print(f"{size} px stores built, {time.monotonic() - start:.0f} s", flush=True)


def open_store(data: str, split: str, size: int) -> None:
    from soda_diffusers.data import ViewStore

    ViewStore.open(data, split, size, progress=False)


# ------------------------------------------------------------------------------------------- wheels


def fetch_wheels(folder: Path, python_version: str) -> None:
    """Download the pure-Python wheels the GPU image lacks, at the versions installed here, into an emptied
    ``folder`` (two versions of one wheel there would both be installed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [arg for platform in WHEEL_PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    python_version, "--implementation", "cp", *platforms, "-d", str(folder), *pins], check=True)
    size = sum(path.stat().st_size for path in folder.glob("*.whl"))
    print(f"{folder}: {len(list(folder.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB")


def install_wheels(folder: Path, site: Path, timeout: float = 300) -> None:
    """Install the wheels of ``folder`` whose distributions this python3 lacks into ``site`` (offline, no
    dependency resolution), and put ``site`` and the checkout on the path of this process and its children."""
    missing = []
    for wheel in sorted(folder.glob("*.whl")):
        try:
            importlib.metadata.version(wheel.name.split("-")[0])
        except importlib.metadata.PackageNotFoundError:
            missing.append(str(wheel))
    if missing:
        print(f"installing {len(missing)} wheels from {folder} into {site}", flush=True)
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
                              "--no-cache-dir", "--upgrade", "--target", str(site), *missing],
                             capture_output=True, text=True, timeout=timeout)
        print(pip.stdout + pip.stderr, end="", flush=True)  # into the log
        if pip.returncode:
            raise RuntimeError(f"pip could not install {', '.join(Path(w).name for w in missing)} (exit code "
                               f"{pip.returncode}): {(pip.stderr.strip().splitlines() or ['no message'])[-1]}")
    paths = [str(REPO), *([str(site)] if site.is_dir() else [])]
    sys.path[:0] = [path for path in paths if path not in sys.path]
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])


# ------------------------------------------------------------------------------------------- stages


def stage0(check: Check) -> bool:
    """Install the carried wheels, import what the stages need, check the device and the disk; record it in
    ``results/stage0.json`` and the summary. False (and the reasons in ``check.failures``) where a stage
    could not run."""
    import importlib

    start, failures = time.monotonic(), []
    found = {"wheels": str(check.args.wheels), "imports": {}}
    try:
        install_wheels(Path(check.args.wheels), check.work / "site")
    except Exception as error:
        failures.append(f"stage 0: installing the wheels of {check.args.wheels}: {error}")
    for module in STAGE0_MODULES:
        try:
            imported = importlib.import_module(module)
            found["imports"][module] = getattr(imported, "__version__", "ok")
        except Exception as error:
            found["imports"][module] = f"{type(error).__name__}: {error}"
            failures.append(f"stage 0: import {module}: {type(error).__name__}: {error}")
    if "torch" in sys.modules:
        import torch

        found["cuda"] = torch.cuda.is_available()
        found["device"] = torch.cuda.get_device_name() if found["cuda"] else "CPU"
        found["bf16"] = bool(found["cuda"] and torch.cuda.is_bf16_supported())
        if not found["cuda"] and not check.dry:
            failures.append("stage 0: torch sees no CUDA device (torch.cuda.is_available() is False)")
        elif not found["bf16"] and not check.dry:
            failures.append(f"stage 0: {found['device']} has no bf16, which the nmr configs train in")
    check.work.mkdir(parents=True, exist_ok=True)
    found["free_disk_gib"] = round(shutil.disk_usage(check.work).free / 2**30, 1)
    if found["free_disk_gib"] < check.args.min_free_gib:
        failures.append(f"stage 0: {found['free_disk_gib']} GiB free in {check.work}, less than --min-free-gib "
                        f"{check.args.min_free_gib}")
    found["seconds"] = round(time.monotonic() - start, 1)
    found["failures"] = failures
    check.results.mkdir(parents=True, exist_ok=True)
    (check.results / "stage0.json").write_text(json.dumps(found, indent=2))
    check.failures += failures
    for failure in failures:
        check.say(failure)
    check.say(f"stage 0: {'failed' if failures else 'ok'} in {found['seconds']} s")
    publish(check)
    return not failures


def run_stage(check: Check, stage: int) -> None:
    """Stage ``stage``: its run's bench, training and evaluation (and the tests, in stage 1), its results in
    ``work/results/<run>/``, the out folder written again after each of them."""
    run, args, start = RUNS[stage], check.args, time.monotonic()

    def seconds_left() -> float:  # of the stage's time, less what follows the training
        return args.stage_minutes * 60 - (time.monotonic() - start) - RESERVE_S

    def budget(cap_s: float | None = None, reserve_s: float = 0.0) -> float | None:
        """A child's timeout: what the stage has left (less ``reserve_s``, at least a minute), at most ``cap_s``."""
        left = max(60.0, seconds_left() + RESERVE_S - reserve_s)
        return min(left, cap_s) if cap_s else (left if math.isfinite(left) else None)

    results = check.results / run
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    timings, first_failure = {}, len(check.failures)
    record = {"run": run, "stage": stage, "dry_run": check.dry, "timings_s": timings, "commands": {}}

    def save() -> None:  # the record so far, and the out folder from it
        record["failures"] = check.failures[first_failure:]
        (results / "run.json").write_text(json.dumps(record, indent=2))
        publish(check)

    check.start_data()
    if stage == 1:
        with timed(timings, "tests"):
            run_tests(check, timeout=budget(args.tests_minutes * 60))
        save()
    config = yaml_config(run)
    size = 32 if run == "nmr-32" else 64
    with timed(timings, "data"):  # all of it before the bench: its timings need quiet cores
        for data_size in (32, 64):
            check.wait_data(data_size, timeout=budget())
    with timed(timings, "bench"):
        # The bench may take what the stage has left but the training's first minute.
        record["commands"]["bench"] = bench_command = bench_argv(check, config, size, results / "bench.json")
        check.run([sys.executable, *bench_command], f"bench {run}",
                  timeout=budget(args.bench_minutes * 60, reserve_s=RESERVE_S + 60))
        bench = load_json(results / "bench.json")
    save()

    minutes = args.minutes
    if seconds_left() / 60 < minutes:
        minutes = max(min(minutes, 0.5), seconds_left() / 60)
        check.say(f"train {run}: {minutes:.2f} minutes instead of {args.minutes}, to end the stage within "
                  f"{args.stage_minutes} minutes")
    option, estimate = choose_option(bench, minutes * 60)
    batch = 4 if check.dry else config["train_batch_size"]
    steps = estimate / batch if estimate else None
    ema_decay = fitting_ema_decay(config.get("ema_decay", 0.9999), steps)
    record.update(option=option, minutes=round(minutes, 3), minutes_asked=round(args.minutes, 3),
                  samples_estimate=estimate, steps_estimate=round(steps) if steps else None, ema_decay=ema_decay,
                  ema_decay_config=config.get("ema_decay"))
    run_dir = check.work / "runs" / run
    shutil.rmtree(run_dir, ignore_errors=True)
    record["commands"]["train"] = train_command = train_argv(check, run, config, size, run_dir, minutes, option,
                                                             estimate, ema_decay)
    with timed(timings, "train"):
        check.run([sys.executable, *train_command], f"train {run}", timeout=minutes * 60 + args.train_grace)
    collect(check, run, run_dir, size, record)
    save()

    record["commands"]["evaluate"] = eval_command = [
        "evaluate", "--pipeline", str(run_dir), "--data", str(check.data), "--type", "nvs", "--split", "val",
        "--out", str(run_dir / "evaluate"), "--limit", str(args.eval_objects), "--steps", "5" if check.dry else "50"]
    with timed(timings, "evaluate"):
        if (run_dir / "model_index.json").is_file():
            check.run([sys.executable, "-m", "soda_diffusers.cli", *eval_command], f"evaluate {run}",
                      timeout=budget())
    collect(check, run, run_dir, size, record)
    timings["stage"] = round(time.monotonic() - start, 1)
    save()


def fitting_ema_decay(decay: float, steps: float | None) -> float:
    """``decay``, or where the run is shorter than the EMA's window (about ``1 / (1 - decay)`` steps) the
    largest of 0.999, 0.99, ... whose window it spans. Unknown steps: at most 0.999, for a run of minutes."""
    if not steps:
        return min(decay, 0.999)
    while decay > 0.9 and steps < 1 / (1 - decay):
        decay = 1 - (1 - decay) * 10
    return round(decay, 6)


@contextlib.contextmanager
def timed(timings: dict, name: str):
    start = time.monotonic()
    try:
        yield
    finally:
        timings[name] = round(time.monotonic() - start, 1)


def run_tests(check: Check, timeout: float | None = None) -> None:
    code, tail = check.run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-ra", "-p", "no:cacheprovider"],
                           "tests", timeout=timeout)
    lines = [line.strip("= ") for line in tail.splitlines() if re.match(r"^=+ .* in [\d.]+s", line)]
    summary = lines[-1] if lines else "no pytest summary line"
    (check.results / "tests.json").write_text(json.dumps({"exit_code": code, "summary": summary}))


def tiny_flags(size: int) -> list[str]:
    """--dry-run's model, for the bench and the training alike: soda-tiny made tinier, at ``size`` px."""
    return ["--preset", "soda-tiny", "--encoder", json.dumps({**TINY, "sample_size": size}),
            "--unet", json.dumps({**TINY, "sample_size": size, "patch_size": 2})]


def bench_argv(check: Check, config: dict, size: int, json_path: Path) -> list[str]:
    argv = ["benchmarks/bench_models.py", "--json", str(json_path)]
    if check.dry:
        return argv + ["--presets", *tiny_flags(size)[1:], "--device", "cpu", "--precision", "fp32", "--batch", "2",
                       "--steps", "1", "--sample-batch", "1", "--threads", "2", "--options", "none", "channels_last"]
    return argv + ["--presets", config["preset"], "--device", "cuda", "--precision", "bf16",
                   "--batch", str(config["train_batch_size"]), "--options", *OPTION_FLAGS]


def train_argv(check: Check, run: str, config: dict, size: int, run_dir: Path, minutes: float, option: str,
               samples_estimate: float | None, ema_decay: float) -> list[str]:
    batch = 4 if check.dry else config["train_batch_size"]
    # About 6 validations (quality against minutes) in the run; a checkpoint at its end only.
    validation_steps = max(1, round(samples_estimate / batch / 6)) if samples_estimate else 250
    argv = ["training/train_soda.py", "--config", run, "--data", str(check.data), "--output_dir", str(run_dir),
            "--max_train_minutes", f"{minutes:.3f}", "--validation_steps", str(validation_steps),
            "--checkpointing_steps", str(10**9), "--checkpoints_total_limit", "1", "--report_to", "none",
            "--dataloader_num_workers", str(0 if check.dry else min(8, (os.cpu_count() or 2) // 2)),
            "--ema_decay", str(ema_decay), *OPTION_FLAGS[option]]
    if check.dry:
        argv += [*tiny_flags(size), "--mixed_precision", "no", "--train_batch_size", str(batch), "--torch_threads",
                 "2", "--validation_objects", "2", "--validation_inference_steps", "2"]
    return argv


def yaml_config(run: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / "training" / "configs" / f"{run}.yaml").read_text())


def choose_option(bench: dict | None, seconds: float) -> tuple[str, float | None]:
    """The bench option that trains the most samples in ``seconds`` (samples/s times the seconds left
    after its compilation), with that estimate; ``none`` (no flag to fail) when the bench measured none."""
    rows = [row for row in (bench or {}).get("rows", []) if "error" not in row]
    if not rows:
        return "none", None
    best = max(rows, key=lambda row: row["train_samples_per_s"] * max(0.0, seconds - row["compile_s"]))
    return best["option"], best["train_samples_per_s"] * max(0.0, seconds - best["compile_s"])


# ------------------------------------------------------------------------------------------ results


def collect(check: Check, run: str, run_dir: Path, size: int, record: dict) -> None:
    """Copy the run's small files into its results folder and draw its curves and val samples."""
    results = check.results / run
    for path in (run_dir / "train_log.jsonl", run_dir / "train_summary.json", run_dir / "train_config.json",
                 run_dir / "learning_curve.png", check.data.parent / "prepare.log"):
        if path.is_file():
            shutil.copy(path, results / path.name)
    eval_dir = run_dir / "evaluate"
    for path in eval_dir.glob("*"):
        if path.suffix in (".json", ".md", ".png"):
            shutil.copy(path, results / path.name)
    log = read_log(results / "train_log.jsonl")
    if log:
        curves(log, run).save(results / "curves.png")
    if (results / "metrics.json").is_file():
        samples(check, eval_dir, size).save(results / "samples.png")
    record["versions"] = versions()


def versions() -> dict:
    import torch

    found = {"python": sys.version.split()[0], "torch": torch.__version__,
             "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}
    for name in ("diffusers", "accelerate", "datasets"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def curves(log: list[dict], run: str):
    """Training loss (and val loss) against minutes, beside val PSNR when the log has it, as one image."""
    import PIL.Image

    from soda_diffusers.visualize import draw_curves

    minutes = [row["elapsed_s"] / 60 for row in log]
    window = max(1, len(log) // 50)  # the loss of single steps is noise: a running mean
    losses = [row["loss"] for row in log]
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    loss_curves = {f"train loss (mean of {window})": (minutes, smooth)}
    val = [row for row in log if "val_loss" in row]
    if val:
        loss_curves["val loss"] = ([row["elapsed_s"] / 60 for row in val], [row["val_loss"] for row in val])
    label = "{:.1f} min".format
    panels = [draw_curves(loss_curves, f"{run}: loss", size=(480, 300), x_label=label)]
    quality = [row for row in log if "val_psnr" in row]
    if quality:
        x = [row["elapsed_s"] / 60 for row in quality]
        psnr = {"samples": (x, [row["val_psnr"] for row in quality])}
        if "val_copy_source_psnr" in quality[0]:
            psnr["copy the source"] = (x, [row["val_copy_source_psnr"] for row in quality])
        panels.append(draw_curves(psnr, f"{run}: val PSNR (dB)", size=(480, 300), log_y=False, x_label=label))
    image = PIL.Image.new("RGB", (sum(panel.width for panel in panels), panels[0].height), "white")
    for i, panel in enumerate(panels):
        image.paste(panel, (i * panels[0].width, 0))
    return image


def samples(check: Check, eval_dir: Path, size: int, count: int = 3):
    """Real views over generated ones (the source view in its place) of the first evaluated val objects."""
    import torch

    from soda_diffusers.data import NMRObjects
    from soda_diffusers.evaluation.runner import (
        NVS_RECORDS_FILE,
        generated_views_path,
        load_view_strip,
        read_nvs_records,
    )
    from soda_diffusers.visualize import make_grid

    objects = NMRObjects(str(check.data), split="val", image_size=size, store=True)
    index_of = {object_id: index for index, object_id in enumerate(objects.object_ids)}
    rows = []
    for object_id, record in list(read_nvs_records(eval_dir / NVS_RECORDS_FILE).items())[:count]:
        real = objects[index_of[object_id]]["images"]
        generated = real.clone()
        views = record["target_views"]
        strip = load_view_strip(generated_views_path(eval_dir, object_id), len(views))
        generated[views] = strip.float() / 127.5 - 1
        rows += [real, generated]
    return make_grid(torch.cat(rows), columns=rows[0].shape[0], scale=max(1, 64 // size))


def restore_previous(check: Check, paths: list[str]) -> None:
    """Bring the results of earlier stages (their ``gpu_check.tar.gz``) into the work folder, except runs
    that this folder has already."""
    for path in map(Path, paths):
        archive = path / "gpu_check.tar.gz" if path.is_dir() else path
        if not archive.is_file():
            print(f"--previous {path}: no gpu_check.tar.gz there, nothing taken", flush=True)
            continue
        with tarfile.open(archive) as tar:
            # A run (results/<run>/...) or a file of results/ is taken only where the work folder lacks it.
            members = [m for m in tar.getmembers() if m.name.startswith("results/")
                       and not (check.work / Path(*Path(m.name).parts[:2])).exists()]
            tar.extractall(check.work, members=members, filter="data")
            runs = sorted({Path(m.name).parts[1] for m in members if len(Path(m.name).parts) > 2})
            print(f"--previous {archive}: {', '.join(runs) or 'nothing new'}", flush=True)


def publish(check: Check) -> Path:
    """Write the out folder from the results so far: summary.md first, then metrics-<run>.json, sheet.png and
    gpu_check.tar.gz (log.txt is written as the command runs). Called after every finished piece."""
    out, results = check.out, check.results
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    runs = [json.loads((results / run / "run.json").read_text()) for run in RUNS.values()
            if (results / run / "run.json").is_file()]
    write_atomically(out / "summary.md", summary_markdown(check, runs))
    shutil.copy(out / "summary.md", results / "summary.md")
    for record in runs:
        if (results / record["run"] / "metrics.json").is_file():
            shutil.copy(results / record["run"] / "metrics.json", out / f"metrics-{record['run']}.json")
    pictures = [results / record["run"] / name for record in runs for name in ("curves.png", "samples.png")
                if (results / record["run"] / name).is_file()]
    if pictures:
        import PIL.Image

        images = [PIL.Image.open(path).convert("RGB") for path in pictures]
        sheet = PIL.Image.new("RGB", (max(p.width for p in images), sum(p.height + 10 for p in images)), "white")
        y = 0
        for picture in images:
            sheet.paste(picture, (0, y))
            y += picture.height + 10
        sheet.save(out / "sheet.png")
    with tarfile.open(out / "gpu_check.tar.gz.part", "w:gz") as tar:
        tar.add(results, arcname="results")
    os.replace(out / "gpu_check.tar.gz.part", out / "gpu_check.tar.gz")
    return out / "summary.md"


def write_atomically(path: Path, text: str) -> None:
    """A kill while writing leaves the previous file, not half of the new one."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def summary_markdown(check: Check, runs: list[dict]) -> str:
    """The summary of what has finished so far: stage 0, the tests, the bench tables, the runs side by side."""
    results = check.results
    lines = ["# GPU check: soda-nmr-32 and soda-nmr-64" + (" (dry run, CPU, tiny sizes)" if check.dry else ""), ""]
    versions_found = next((record["versions"] for record in reversed(runs) if "versions" in record), None)
    if versions_found:
        v = versions_found
        lines += [f"{v['device']}; python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, "
                  f"accelerate {v['accelerate']}, datasets {v['datasets']}.", ""]
    failures = list(dict.fromkeys([f for record in runs for f in record.get("failures", [])] + check.failures))
    if failures:
        lines += ["**Failed:** " + "; ".join(failures) + " (see the logs).", ""]
    stage0_found = load_json(results / "stage0.json")
    if stage0_found:
        imports = stage0_found["imports"]
        failed = [name for name, value in imports.items() if " " in str(value)]
        lines += ["## Stage 0", "",
                  f"{'Failed' if stage0_found['failures'] else 'Ready'} in {stage0_found['seconds']} s: "
                  f"{stage0_found.get('device', 'torch not importable')}"
                  + (f", bf16 {'yes' if stage0_found.get('bf16') else 'no'}" if "bf16" in stage0_found else "")
                  + f"; {stage0_found['free_disk_gib']} GiB free; {len(imports) - len(failed)} of {len(imports)} "
                  f"modules imported" + (f" (not: {', '.join(failed)})" if failed else "") + ".", ""]
    tests = load_json(results / "tests.json")
    if tests:
        lines += ["## Tests", "", f"`pytest tests/test_gpu.py -ra`: {tests['summary']} (exit code "
                  f"{tests['exit_code']}).", ""]
    benches = [(record, load_json(results / record["run"] / "bench.json")) for record in runs]
    if any(bench for _, bench in benches):
        lines += ["## Benchmarks (quiet cores: the data was rendered before)", ""]
    for record, bench in benches:
        if bench:
            lines += [f"`python3 {shlex.join(record['commands']['bench'])}` (batch {bench['batch']}, DDIM-50 at "
                      f"batch {bench['sample_batch']}):", "", *bench["table"], ""]
    trained = [record for record in runs if "option" in record]
    if trained:
        lines += training_table(check, trained)
    return "\n".join(lines) + "\n"


def training_table(check: Check, runs: list[dict]) -> list[str]:
    results = check.results
    lines = ["## Training and evaluation", "",
             "| | " + " | ".join(record["run"] for record in runs) + " |", "|---|" + "---:|" * len(runs)]
    summaries = [load_json(results / record["run"] / "train_summary.json") for record in runs]
    metrics = [load_json(results / record["run"] / "metrics.json").get("nvs", {}) for record in runs]
    logs = [read_log(results / record["run"] / "train_log.jsonl") for record in runs]
    rows = [("option (most samples in the minutes)", [r["option"] for r in runs]),
            ("minutes", [f"{r['minutes']:.2f}" + (f" ({r['minutes_asked']:.2f} asked; shortened to fit the stage)"
                                                  if r["minutes"] < r["minutes_asked"] else "") for r in runs]),
            ("steps (expected from the bench)", [f"{s.get('train_steps', 'failed')} ({r.get('steps_estimate') or '?'})"
                                                 for s, r in zip(summaries, runs)]),
            ("EMA decay (config's)", [f"{r['ema_decay']:g} ({r['ema_decay_config']:g})" if r.get("ema_decay_config")
                                      else f"{r['ema_decay']:g}" for r in runs]),
            ("validation seconds, inside the minutes", [f"{sum(row.get('validation_s', 0) for row in log):.0f}"
                                                        for log in logs]),
            ("samples/s", [f"{s['train_steps'] * s['batch_size'] / s['train_seconds']:.0f}" if s else ""
                           for s in summaries]),
            ("peak GPU memory (GiB)", [f"{s['peak_gpu_memory_gib']:.1f}" if s.get("peak_gpu_memory_gib") else "n/a"
                                       for s in summaries]),
            ("val objects (DDIM-50)" if not check.dry else "val objects", [m.get("objects", "") for m in metrics])]
    baselines = {}
    for m in metrics:
        baselines.update(m.get("baselines", {}))
    for key, title, digits in METRICS:
        rows.append((f"SODA {title}", [fmt(m.get(key), digits) for m in metrics]))
        for name in baselines:
            rows.append((f"{name} {title}", [fmt(m.get("baselines", {}).get(name, {}).get(key), digits)
                                             for m in metrics]))
    steps = ("tests", "data", "bench", "train", "evaluate", "stage")
    rows.append((f"seconds ({', '.join(steps)})", [", ".join(str(r["timings_s"].get(k, "-")) for k in steps)
                                                   for r in runs]))
    lines += [f"| {name} | " + " | ".join(map(str, values)) + " |" for name, values in rows]
    lines += ["", "Baselines: copy_source copies the source view to every target, mean_image is the mean training "
              "image, other_source is the model given another object's source view.", ""]
    lines += ["![curves and samples](sheet.png)", "", "## Commands", ""]
    for record in runs:
        commands = record["commands"]
        lines += [f"- `python3 {shlex.join(commands['train'])}`"]
        if "evaluate" in commands:
            lines += [f"- `soda-nvs {shlex.join(commands['evaluate'])}`"]
    return lines


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def fmt(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# --------------------------------------------------------------------------------------------- main


class Tee:
    """This process's output, also appended to a file."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, path.open("a", encoding="utf-8")

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.file.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fetch_wheels:
        fetch_wheels(Path(args.wheels), args.python_version)
        return 0
    check = Check(args)
    os.environ["SODA_DIFFUSERS_CACHE"] = str(check.work / "cache")  # the view stores of training and evaluation
    if args.prepare_data:  # the data job, a child of a command whose stage 0 installed the wheels
        install_wheels(Path(args.wheels), check.work / "site")
        prepare_data(check, args.prepare_data)
        return 0
    check.out.mkdir(parents=True, exist_ok=True)
    stdout = sys.stdout
    sys.stdout = Tee(stdout, check.out / "log.txt")  # first: whatever happens next is in the log
    previous_handler = signal.signal(signal.SIGTERM, stop_on_sigterm)
    stages = {"1": [1], "2": [2], "all": [1, 2], "summary": []}[args.stage]
    try:
        if args.stage != "summary" and not stage0(check):
            check.say("stage 0 failed: no stage was run (summary.md says why)")
            return 1
        restore_previous(check, args.previous)
        for stage in stages:
            try:
                run_stage(check, stage)
            except Exception as error:  # keep what the other stage and the summary can still give
                check.failures.append(f"stage {stage}: {type(error).__name__}: {error}")
                check.say(check.failures[-1])
        check.finish_data()
    except KeyboardInterrupt as interrupt:
        check.failures.append(f"stopped part-way ({interrupt or 'Ctrl-C'}): the summary holds what finished")
        check.say(check.failures[-1])
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        check.stop_data()
        sys.stdout.flush()
        for stage in stages:
            if (check.results / RUNS[stage]).is_dir():
                shutil.copy(check.out / "log.txt", check.results / RUNS[stage] / "log.txt")
        summary = publish(check)
        print(summary.read_text())
        check.say(f"wrote {', '.join(sorted(p.name for p in check.out.iterdir()))} to {check.out}")
        sys.stdout.file.close()
        sys.stdout = stdout
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
