"""Training throughput with data loading included: the real training script, run for a few steps per
config, dataset and number of DataLoader workers, each run in a fresh process.

Prints per run: samples/s over the steady steps (the first --warmup steps are left out), the fraction
of each step spent waiting for the batch (data), the seconds from the launch of the process to its
first step (startup: imports, the model, opening the view stores; workers start within the first
step, which the steady figures leave out), and the peak resident
memory of the training process. Each dataset's view stores are built first, and that time is printed
on its own: the runs then measure training once the cache exists, as every run after the first does.

    python benchmarks/bench_train.py [--configs synthetic-tiny nmr-32] [--steps 8] [--batch 32]
                                     [--data PATH ...] [--workers 0 2]

For the data path's scaling, the same config on 390 and 3,900 synthetic objects:

    soda-nvs make-synthetic --out data/syn-30 --objects-per-category 30
    soda-nvs make-synthetic --out data/syn-300 --objects-per-category 300 --num-workers 2
    python benchmarks/bench_train.py --configs synthetic-tiny --data data/syn-30 data/syn-300 --workers 0 2 --steps 40

For OpenMP's wait policy, idle and with other processes computing on the same cores (``--busy N``: N
processes that spin in Python beside each run), through the script users run, each run's thread settings
from the environment it is given (``default``: the variables unset, so the script chooses):

    python benchmarks/bench_train.py --configs synthetic-tiny --steps 22 --warmup 4 --rounds 2 --busy 0 1 \
        --env default OMP_WAIT_POLICY=PASSIVE OMP_WAIT_POLICY=ACTIVE OMP_WAIT_POLICY= GOMP_SPINCOUNT=30000
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from soda_diffusers.threads import THREAD_VARIABLES

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train_soda.py"


def run_environment(variant: str) -> dict:
    """This process's environment with the thread variables of ``variant``: ``default`` sets none of
    them (the training script chooses), ``NAME=VALUE[,NAME=VALUE]`` sets those (an empty value too)."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    if variant != "default":
        for setting in variant.split(","):
            name, _, value = setting.partition("=")
            env[name] = value
    return env


@contextlib.contextmanager
def busy_processes(count: int):
    """``count`` processes that each keep one core busy (a Python loop), for as long as the block runs."""
    processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield processes
    finally:
        for process in processes:
            process.kill()
            process.wait()


def build_stores(config: str, data: str, cache_dir: str) -> float:
    """Seconds to build the train and val view stores of ``data`` at the config's resolution."""
    sys.path.insert(0, str(SCRIPT.parent))
    import train_soda

    from soda_diffusers.data import ViewStore

    args = train_soda.parse_args(["--config", config, "--data", data])
    size = train_soda.build_pipeline(args).unet.config.sample_size
    start = time.monotonic()
    for split in ("train", "val"):
        ViewStore.open(train_soda.data_path(args), split, size, args.categories, cache_dir=cache_dir)
    return time.monotonic() - start


def bench_run(config: str, steps: int, warmup: int, batch: int | None, data: str | None, workers: int,
              cache_dir: str, env: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        command = [
            sys.executable, str(SCRIPT), "--config", config, "--output_dir", out, "--max_train_steps", str(steps),
            "--lr_warmup_steps", "0", "--validation_steps", str(10 * steps), "--checkpointing_steps", str(10 * steps),
            "--use_ema", "false", "--report_to", "none", "--mixed_precision", "no",
            "--dataloader_num_workers", str(workers), "--data_cache_dir", cache_dir,
        ]
        if batch:
            command += ["--train_batch_size", str(batch)]
        # The GPU configs name the real NMR zip; without --data they train on the synthetic data.
        command += ["--data", data or ""]
        with open(Path(out) / "stdout.txt", "w") as log_file:
            launched_at = time.time()
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
            # The process's own peak (and its DataLoader workers'), not the largest child's so far.
            _, status, usage = os.wait4(process.pid, 0)
        if status:
            output = (Path(out) / "stdout.txt").read_text()
            raise SystemExit(f"{config}: training failed (status {status}):\n{output[-3000:]}")
        log = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]
        config_used = json.loads((Path(out) / "train_config.json").read_text())
        summary = json.loads((Path(out) / "train_summary.json").read_text())
    steady = log[warmup:]
    step_seconds = [config_used["train_batch_size"] / r["samples_per_s"] for r in steady]
    return {
        "config": config,
        "preset": config_used["preset"],
        "batch": config_used["train_batch_size"],
        "samples_per_s": config_used["train_batch_size"] / statistics.median(step_seconds),
        "step_s": statistics.median(step_seconds),
        "data_fraction": sum(r["data_s"] for r in steady) / sum(step_seconds),
        "startup_s": summary["first_step_at"] - launched_at,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "thread_settings": summary.get("thread_settings"),
    }


def count_objects(data: str | None) -> str:
    if not data:
        return "synthetic"
    from soda_diffusers.data import open_storage

    storage = open_storage(data)
    return str(sum(len(storage.object_ids(c, s)) for c in storage.categories() for s in ("train", "val", "test")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["synthetic-tiny", "nmr-32"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the figures")
    parser.add_argument("--batch", type=int, default=32, help="batch size for every config (0: the config's own)")
    parser.add_argument("--data", nargs="+", default=[None], help="NMR-format datasets (default: the synthetic data)")
    parser.add_argument("--workers", nargs="+", type=int, default=[0], help="DataLoader workers to try")
    parser.add_argument("--cache-dir", help="where the view stores go (default: a temporary folder)")
    parser.add_argument("--env", nargs="+", default=["default"],
                        help="thread settings to try: default (none set) or NAME=VALUE[,NAME=VALUE] (default: default)")
    parser.add_argument("--busy", nargs="+", type=int, default=[0],
                        help="processes that keep a core busy beside each run (default 0: an idle machine)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every run this often, interleaved")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must be larger than --warmup ({args.warmup})")

    with tempfile.TemporaryDirectory(prefix="bench-stores-") as temporary:
        cache_dir = args.cache_dir or temporary
        rows = []
        for data in args.data:
            for config in args.configs:
                seconds = build_stores(config, data or "", cache_dir)
                print(f"{config} on {data or 'the synthetic data'}: view stores built in {seconds:.1f} s", flush=True)
        print("\n| config | objects | workers | batch | threads | busy | samples/s | s/step | waiting for data | startup "
              "| peak RSS |")
        print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        objects = {data: count_objects(data) for data in args.data}
        runs = itertools.product(range(args.rounds), args.data, args.configs, args.workers, args.busy, args.env)
        for _, data, config, workers, busy, variant in runs:
            with busy_processes(busy):
                r = bench_run(config, args.steps, args.warmup, args.batch or None, data, workers, cache_dir,
                              run_environment(variant))
            rows.append(r)
            print(f"| {r['config']} | {objects[data]} | {workers} | {r['batch']} | {variant} ({r['thread_settings']}) | "
                  f"{busy} | {r['samples_per_s']:.1f} | {r['step_s']:.2f} | {100 * r['data_fraction']:.1f}% | "
                  f"{r['startup_s']:.1f} s | {r['peak_rss_mib']:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
