"""Training throughput with data loading included: the real training script, run for a few steps per
config in a fresh process, on the built-in synthetic data (or --data).

Prints per config: samples/s over the steady steps (the first --warmup steps are left out), the
fraction of each step spent getting the batch ready (data), the seconds to load the dataset and
build the run (startup), and the peak resident memory of the process.

    python benchmarks/bench_train.py [--configs synthetic-tiny nmr-32] [--steps 8] [--batch 32] [--data PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train_soda.py"


def bench_config(config: str, steps: int, warmup: int, batch: int | None, data: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        command = [
            sys.executable, str(SCRIPT), "--config", config, "--output_dir", out, "--max_train_steps", str(steps),
            "--lr_warmup_steps", "0", "--validation_steps", str(10 * steps), "--checkpointing_steps", str(10 * steps),
            "--use_ema", "false", "--report_to", "none", "--mixed_precision", "no",
        ]
        if batch:
            command += ["--train_batch_size", str(batch)]
        # The GPU configs name the real NMR zip; on this machine they train on the synthetic data.
        command += ["--data", data] if data else ["--data", ""]
        start = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"{config}: training failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        total = time.monotonic() - start
        log = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]
        config_used = json.loads((Path(out) / "train_config.json").read_text())
    # RUSAGE_CHILDREN holds the largest peak of the children so far: one child per config, run in order
    # of size, so each reading is that config's own peak unless an earlier config was bigger.
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    steady = log[warmup:]
    step_seconds = [config_used["train_batch_size"] / r["samples_per_s"] for r in steady]
    return {
        "config": config,
        "preset": config_used["preset"],
        "batch": config_used["train_batch_size"],
        "samples_per_s": config_used["train_batch_size"] / statistics.median(step_seconds),
        "step_s": statistics.median(step_seconds),
        "data_fraction": sum(r["data_s"] for r in steady) / sum(step_seconds),
        "startup_s": total - log[-1]["elapsed_s"],
        "peak_rss_mib": peak_mib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["synthetic-tiny", "nmr-32"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the figures")
    parser.add_argument("--batch", type=int, default=32, help="batch size for every config (0: the config's own)")
    parser.add_argument("--data", help="an NMR-format dataset (default: the built-in synthetic data)")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must be larger than --warmup ({args.warmup})")

    print("| config | preset | batch | samples/s | s/step | waiting for data | startup | peak RSS |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for config in args.configs:
        r = bench_config(config, args.steps, args.warmup, args.batch or None, args.data)
        print(f"| {r['config']} | {r['preset']} | {r['batch']} | {r['samples_per_s']:.1f} | {r['step_s']:.2f} | "
              f"{100 * r['data_fraction']:.1f}% | {r['startup_s']:.0f} s | {r['peak_rss_mib'] / 1024:.1f} GiB |",
              flush=True)


if __name__ == "__main__":
    main()
