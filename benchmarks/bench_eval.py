"""Throughput of the NVS evaluation (``soda_diffusers.evaluation.runner.run_nvs``): objects per second, each object
being 23 target views generated from one source view and scored (every metric of the protocol; the
baselines, which ``soda-nvs evaluate`` adds, are left out), for several numbers of objects per pipeline call.

    python benchmarks/bench_eval.py [--preset soda-tiny] [--steps 50] [--objects 4] [--batch-objects 1 4]
                                    [--data PATH] [--threads N]

Without ``--data`` a small synthetic NMR dataset is rendered in a temporary directory (one test object
per category). The pipeline is an untrained preset: the work per step is that of a trained one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from soda_diffusers import SODANovelViewPipeline
from soda_diffusers.data import NMR_CATEGORIES, NMRObjects, make_synthetic_nmr
from soda_diffusers.evaluation.runner import run_nvs
from soda_diffusers.schedules import set_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="soda-tiny")
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--objects", type=int, default=4, help="test objects to evaluate per setting")
    parser.add_argument("--batch-objects", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--data", help="an NMR-format dataset (default: render a synthetic one)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            # 3 objects per category put one in the test split: one category per test object.
            categories = sorted(NMR_CATEGORIES)[: args.objects]
            data = make_synthetic_nmr(Path(tmp) / "nmr", 3, seed=0, categories=categories)
        pipe = set_scheduler(SODANovelViewPipeline.from_preset(args.preset), args.scheduler)
        pipe.set_progress_bar_config(disable=True)
        objects = NMRObjects(data, split="test", image_size=pipe.unet.config.sample_size)
        count = min(args.objects, len(objects))
        # The model's own views only (baselines=()): the figure is the sampler's and the scoring's speed.
        run_nvs(pipe, objects, Path(tmp) / "warm-up", limit=1, num_inference_steps=2, baselines=(), progress=False)

        print(f"{args.preset}, {type(pipe.scheduler).__name__} {args.steps} steps, {count} objects x 23 targets, "
              f"{pipe.unet.config.sample_size} px, {torch.get_num_threads()} threads")
        results = []
        for batch_objects in args.batch_objects:
            start = time.perf_counter()
            run_nvs(pipe, objects, Path(tmp) / f"batch-{batch_objects}", limit=count, batch_objects=batch_objects,
                    num_inference_steps=args.steps, baselines=(), progress=False)
            seconds = time.perf_counter() - start
            results.append({
                "batch_objects": batch_objects,
                "objects": count,
                "seconds": round(seconds, 2),
                "objects_per_s": round(count / seconds, 4),
                "views_per_s": round(count * 23 / seconds, 2),
            })
            print(f"batch-objects {batch_objects}: {count / seconds:.3f} objects/s "
                  f"({count * 23 / seconds:.1f} views/s, {seconds:.1f} s)")
        print(json.dumps(results))


if __name__ == "__main__":
    main()
