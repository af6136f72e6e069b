"""``soda-nvs evaluate``: novel view synthesis scores (pixelNeRF protocol), FID and encoder probes."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from soda_diffusers.schedules import SCHEDULERS

    parser = subparsers.add_parser(
        "evaluate",
        help="score a pipeline on NMR-format data: NVS (PSNR/SSIM/LPIPS), FID, encoder probes",
        description="nvs: every test object (or --limit, or --split val), one source view each (--viewlist, else "
        "the data's source_views.txt, else seeded), the 23 other views as targets; PSNR, SSIM (and pixelNeRF's "
        "SSIM) on [0, 1], LPIPS-VGG on [-1, 1] when its weights are present, foreground IoU and colour error; "
        "for the model and the baselines (copy the source, the mean training image, another object's source); "
        "per object, then over objects, overall and per category. Resumable: rerun with the same --out to continue. "
        "fid: FID of the generated against the real target views. probe: linear and kNN probes of the category "
        "on frozen encoder latents (train split -> test split), and on a randomly initialised encoder. "
        "Writes metrics.json, metrics.md and PNG plots to --out.",
    )
    parser.add_argument("--pipeline", required=True, help="a saved pipeline directory (save_pretrained)")
    parser.add_argument("--data", required=True, help="an NMR-format folder, zip or Arrow directory")
    parser.add_argument(
        "--type", default="nvs", choices=("nvs", "probe", "fid", "all"), help="what to evaluate (default nvs)"
    )
    parser.add_argument("--out", default="outputs/evaluate", help="output directory (default outputs/evaluate)")
    parser.add_argument("--limit", type=int, help="evaluate at most this many objects per split (round-robin over categories)")
    parser.add_argument("--viewlist", help="pixelNeRF view list ('category object view' lines, e.g. src_dvr.txt); "
                        "default: the data's own source_views.txt (the synthetic data has one), else seeded views")
    parser.add_argument("--split", default="test", choices=("val", "test"),
                        help="objects of nvs and fid: test to report, val to tune recipes on (default test)")
    parser.add_argument("--baselines", nargs="*", default=None,
                        help="baselines scored beside the model (default all: copy_source mean_image other_source; "
                        "none with an empty list)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the pipeline's own)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1)")
    parser.add_argument(
        "--batch-objects", type=int, default=4, help="objects (23 targets each) per pipeline call (default 4)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the source/probe views and of the noise")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from soda_diffusers import SODANovelViewPipeline
    from soda_diffusers.evaluation.runner import EVALUATION_TYPES, evaluate
    from soda_diffusers.schedules import set_scheduler

    if not Path(args.pipeline).is_dir():
        raise FileNotFoundError(f"--pipeline: no pipeline directory at {args.pipeline}")
    pipe = SODANovelViewPipeline.from_pretrained(args.pipeline)
    if args.scheduler:
        set_scheduler(pipe, args.scheduler)
    pipe = pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    pipe.set_progress_bar_config(disable=True)  # one bar over objects instead of one per pipeline call
    types = EVALUATION_TYPES if args.type == "all" else (args.type,)
    evaluate(
        pipe,
        args.data,
        args.out,
        types,
        limit=args.limit,
        view_list=args.viewlist,
        split=args.split,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        batch_objects=args.batch_objects,
        **({} if args.baselines is None else {"baselines": args.baselines}),
    )
    out = Path(args.out)
    print((out / "metrics.md").read_text())
    print(f"wrote {out / 'metrics.json'}, {out / 'metrics.md'} and plots in {out}")
    return 0
