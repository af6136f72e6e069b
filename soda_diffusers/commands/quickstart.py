"""``soda-nvs quickstart``: data, a bounded CPU training run, 24-view orbits and an honest report.

The report is ``soda-nvs evaluate``'s NVS protocol, run by its own code: the trained model beside two
baselines (copying the source view; the mean training image) and one ablation (the same model given
another object's source view), so it shows what the bottleneck latent actually carries, and
``soda-nvs evaluate`` on the saved pipeline gives the very same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from soda_diffusers.evaluation.views import VIEW_METRICS
from soda_diffusers.resources import resource_dir
from soda_diffusers.threads import THREAD_VARIABLES, set_wait_policy


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("quickstart", help="train a tiny model on CPU and report how well it does")
    parser.add_argument("--out", default="outputs/quickstart", help="output directory")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, default=None, help="training time budget (default 15)")
    budget.add_argument("--steps", type=int, default=None, help="train for exactly this many steps instead")
    parser.add_argument("--data", help="an NMR-format folder, zip or Arrow directory (default: built-in synthetic)")
    parser.add_argument("--config", default="synthetic-tiny", help="training config (default synthetic-tiny)")
    # All 39 held-out synthetic objects by default: a subset's baseline swings by dB (docs/results.md,
    # "Objects evaluated"). The cap keeps a real NMR test split (8,762) in minutes.
    parser.add_argument("--objects", type=int, default=64, help="held-out objects to evaluate (default 64, or all if fewer)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the evaluation's views and noise are fixed)")
    parser.add_argument("--split", default="test", choices=("val", "test"),
                        help="held-out objects to score: test to report, val to tune recipes on (default test)")
    parser.add_argument("--train-args", default="", help="extra flags for training/train_soda.py, quoted")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_argv = ["--config", args.config, "--output_dir", str(out / "train"), "--seed", str(args.seed)]
    if args.steps is not None:
        train_argv += ["--max_train_steps", str(args.steps)]
    else:
        minutes = 15.0 if args.minutes is None else args.minutes
        # The schedules follow the clock (train_soda.TrainingClock), so the run anneals in its minutes at
        # any speed. The step cap only bounds a much faster machine, and sets the share of the budget
        # that the step-valued warm-ups take: 5 steps a second is above what soda-tiny's step reaches.
        train_argv += ["--max_train_minutes", str(minutes), "--max_train_steps", str(round(minutes * 60 * 5))]
    if args.data:
        train_argv += ["--data", args.data]
    train_argv += shlex.split(args.train_args)
    script = resource_dir("training") / "train_soda.py"
    print(f"training: python {script} {shlex.join(train_argv)}")
    # The script a user runs, in its own process: it chooses OpenMP's waiting from the load it finds, as
    # this process did (so this process's choice is not handed down as if the user had set it).
    env = dict(os.environ)
    if set_wait_policy()["source"] != "user":
        for name in THREAD_VARIABLES:
            env.pop(name, None)
    code = run_training(script, train_argv, env)
    if code:
        return code
    summary = json.loads((out / "train" / "train_summary.json").read_text())
    report = evaluate_quickstart(out, summary, args.objects, args.split)
    print((out / "report.md").read_text())
    return 0 if report else 1


def run_training(script: Path, argv: list[str], env: dict) -> int:
    child = subprocess.Popen([sys.executable, str(script), *argv], env=env)
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:
            pass  # Ctrl-C reaches the training process too: it saves a checkpoint and stops; wait for that


METHODS = (
    ("model", "SODA (trained, true source view)"),
    ("copy_source", "baseline: copy the source view"),
    ("mean_image", "baseline: mean training image"),
    ("other_source", "ablation: another object's source view"),
    ("one_step", "SODA, one-step estimate (the mean of its samples, not a sample)"),
)


def evaluate_quickstart(out: Path, summary: dict, num_objects: int, split: str = "test") -> dict:
    """Score the trained pipeline with ``soda-nvs evaluate``'s own code and defaults (objects, source
    views from the data's view list, noise seeds, baselines), so that
    ``soda-nvs evaluate --pipeline OUT/pipeline --data DATA`` reproduces these numbers exactly."""
    from soda_diffusers import SODANovelViewPipeline
    from soda_diffusers.evaluation.runner import evaluate
    from soda_diffusers.visualize import plot_curves

    pipe = SODANovelViewPipeline.from_pretrained(out / "train")
    pipe.save_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)  # one bar, over the objects
    data = summary["data"]
    start = time.monotonic()
    nvs = evaluate(pipe, data, out / "evaluate", ("nvs",), limit=num_objects, split=split)["nvs"]
    sampling_seconds = time.monotonic() - start
    # One step from pure noise: the model's estimate of the mean of all views it could generate.
    one_step = evaluate(pipe, data, out / "evaluate-one-step", ("nvs",), limit=num_objects, split=split,
                        num_inference_steps=1, baselines=())["nvs"]
    scores = {"model": nvs, **nvs["baselines"], "one_step": one_step}
    # Every metric of the NVS protocol but LPIPS (its weights are not on a fresh machine).
    result = {method: {name: scores[method][name] for name in VIEW_METRICS} for method, _ in METHODS}
    command = f"soda-nvs evaluate --pipeline {out / 'pipeline'} --data {data}"
    result.update(
        objects=nvs["objects"],
        split=split,
        train_steps=summary["train_steps"],
        train_seconds=summary["train_seconds"],
        matmul_dtype=summary["matmul_dtype"],
        matmul_tflops=[summary["matmul_tflops_start"], summary["matmul_tflops_end"]],
        thread_settings=summary.get("thread_settings"),
        sampling_seconds=round(sampling_seconds, 1),
        num_inference_steps=nvs["settings"]["num_inference_steps"],
        scheduler=nvs["settings"]["scheduler"],
        # Fewer objects than the limit: the limit took them all and the command needs none.
        evaluate_command=command + ("" if split == "test" else f" --split {split}")
        + ("" if nvs["objects"] < num_objects else f" --limit {num_objects}"),
    )
    (out / "quickstart.json").write_text(json.dumps(result, indent=2))

    log = [json.loads(line) for line in (out / "train" / "train_log.jsonl").read_text().splitlines()]
    log = [row for row in log if "loss" in row]
    curves = {"train loss": ([r["step"] for r in log], [r["loss"] for r in log])}
    validation = [r for r in log if "val_loss" in r]
    if validation:
        curves["val loss (held-out objects)"] = ([r["step"] for r in validation], [r["val_loss"] for r in validation])
    plot_curves(curves, out / "loss.png", title="SODA quickstart: denoising loss")
    objects = write_samples(out, data, pipe.unet.config.sample_size, split)
    write_report(out, result, objects)
    return result


def write_samples(out: Path, data: str, size: int, split: str) -> list[tuple[str, int]]:
    """A grid (real views over generated ones, the source in its place) and an orbit GIF per evaluated
    object, from the views the evaluation generated. Returns ``(object_id, source_view)`` of each."""
    from soda_diffusers.data import NMRObjects
    from soda_diffusers.evaluation.runner import (
        NVS_RECORDS_FILE,
        generated_views_path,
        load_view_strip,
        read_nvs_records,
    )
    from soda_diffusers.visualize import make_grid, save_gif

    objects = NMRObjects(data, split=split, image_size=size, store=True)
    index_of = {object_id: index for index, object_id in enumerate(objects.object_ids)}
    samples_dir = out / "samples"
    samples_dir.mkdir(exist_ok=True)
    shown = []
    for object_id, record in read_nvs_records(out / "evaluate" / NVS_RECORDS_FILE).items():
        real = objects[index_of[object_id]]["images"]
        views, source_view = record["target_views"], record["source_view"]
        generated = load_view_strip(generated_views_path(out / "evaluate", object_id), len(views)).float() / 127.5 - 1
        full = real.clone()
        full[views] = generated
        name = object_id.replace("/", "-")
        make_grid(torch.cat([real, full]), columns=24, scale=2).save(samples_dir / f"{name}-grid.png")
        save_gif(torch.cat([real, full], dim=3), samples_dir / f"{name}-orbit.gif")
        shown.append((object_id, source_view))
    return shown


def describe_thread_settings(settings: dict | None) -> str:
    """``{"source": "user", "OMP_WAIT_POLICY": "PASSIVE"}`` -> ``OMP_WAIT_POLICY=PASSIVE (user)``."""
    if not settings:
        return "not recorded"
    variables = " ".join(f"{name}={value}" for name, value in settings.items() if name != "source")
    return f"{variables} ({settings['source']})" if variables else settings["source"]


def write_report(out: Path, result: dict, objects: list[tuple[str, int]]) -> None:
    from soda_diffusers.evaluation.runner import NVS_COLUMNS, metric_cells, metric_titles

    columns = [column for column in NVS_COLUMNS if column[0] != "lpips"]  # LPIPS's weights are not on a fresh machine
    model = result["model"]
    best_baseline = max(result["copy_source"]["psnr"], result["mean_image"]["psnr"])
    lines = [
        "# SODA quickstart report",
        "",
        f"Trained {result['train_steps']} steps in {result['train_seconds'] / 60:.1f} min, on a machine whose dense "
        f"{result['matmul_dtype']} matmul ran at {result['matmul_tflops'][0]:.2f} TFLOP/s at the start and "
        f"{result['matmul_tflops'][1]:.2f} at the end (the steps, and so the scores, follow that speed), "
        f"OpenMP's waiting {describe_thread_settings(result['thread_settings'])}; "
        f"{result['objects']} held-out objects ({result['split']} split), one source view each (the data's view "
        f"list), the 23 other views as targets, {result['scheduler']} with {result['num_inference_steps']} steps "
        f"(sampling took {result['sampling_seconds']:.0f} s). The same numbers come from "
        f"`{result['evaluate_command']}`.",
        "",
        f"| method | {metric_titles(columns)} |",
        "|---|" + "---:|" * len(columns),
        *[f"| {label} | {metric_cells(result[key], columns)} |" for key, label in METHODS],
        "",
        f"- Against the best baseline: {model['psnr'] - best_baseline:+.2f} dB PSNR; against copying the source: "
        f"{model['psnr'] - result['copy_source']['psnr']:+.2f} dB.",
        f"- True source view vs another object's: {model['psnr'] - result['other_source']['psnr']:+.2f} dB PSNR "
        "(what the bottleneck latent carries about the object).",
        "- FG IoU: overlap of the object's silhouette with the target's (foreground: pixels not near white); "
        "FG colour error: distance between the mean object colours, 0-255 RGB (lower is better), split into "
        "its brightness part (along the grey axis: shading, or a pale rim drawn around the object) and its "
        "chroma part (the hue); light grey: the pale pixels (darkest channel 208-238 of 255) in the views "
        "over those in the targets, where a rim drawn around the object shows.",
        f"- The one-step estimate scores {result['one_step']['psnr'] - model['psnr']:+.2f} dB against the samples: "
        "PSNR rewards the mean of the plausible views, and a sample, sharp but wrong in detail, pays for the "
        "uncertainty left about the unseen sides.",
        "",
        *([] if not (out / "train" / "learning_curve.png").is_file() else [
            "Quality during training, on fixed val pairs (samples, one-step estimate, copying the source):",
            "",
            "![learning curve](train/learning_curve.png)",
            "",
        ]),
        "![loss](loss.png)",
        "",
        "Per object (top row: real views; bottom row: generated, the source view in its place):",
        "",
    ]
    for object_id, source_view in objects:
        name = object_id.replace("/", "-")
        lines += [f"- `{object_id}`, source view {source_view}: "
                  f"![grid](samples/{name}-grid.png) ![orbit](samples/{name}-orbit.gif)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
