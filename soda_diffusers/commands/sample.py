"""``soda-nvs sample``: all 24 views of one NMR object generated from one of its views, beside the real ones."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from soda_diffusers.schedules import SCHEDULERS

    parser = subparsers.add_parser(
        "sample",
        help="generate every view of one dataset object from one source view (grids and orbit GIFs)",
        description="Generate the 23 other views of one object of an NMR-format dataset from one of its views "
        "(one batched pipeline call) and write <obj>-real.png, <obj>-source.png, <obj>-gen.png grids and "
        "<obj>-real.gif, <obj>-gen.gif orbits (the source view in its place among the generated ones).",
    )
    parser.add_argument("--pipeline", required=True, help="a saved pipeline directory (save_pretrained)")
    parser.add_argument("--data", required=True, help="an NMR-format folder, zip or Arrow directory")
    parser.add_argument("--out", default="outputs/sample", help="output directory (default outputs/sample)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--objidx", type=int, help="index of the object in the split")
    which.add_argument("--object", help="object id, <synset>/<object>")
    parser.add_argument("--source-view", type=int, help="source view 0..23 (default: a seeded choice)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the pipeline's own)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the object, source view and noise choices")
    parser.add_argument("--split", default="test", help="dataset split (default test)")
    parser.set_defaults(func=run)


def pick_object(objects, objidx: int | None, object_id: str | None, seed: int) -> int:
    import numpy as np

    if object_id is not None:
        if object_id not in objects.object_ids:
            raise ValueError(f"--object: no object {object_id!r} in split {objects.split!r} (expected <synset>/<object>)")
        return objects.object_ids.index(object_id)
    if objidx is not None:
        if not 0 <= objidx < len(objects):
            raise ValueError(f"--objidx: expected 0..{len(objects) - 1}, got {objidx}")
        return objidx
    return int(np.random.default_rng(seed).integers(len(objects)))


def run(args: argparse.Namespace) -> int:
    import torch

    from soda_diffusers import SODANovelViewPipeline
    from soda_diffusers.cameras import NMR_NUM_VIEWS
    from soda_diffusers.data import NMRObjects
    from soda_diffusers.evaluation.views import (
        generate_views_per_seed,
        object_target_rays,
        seeded_view,
        target_views,
        view_seeds,
    )
    from soda_diffusers.schedules import set_scheduler
    from soda_diffusers.visualize import make_grid, save_gif

    if not Path(args.pipeline).is_dir():
        raise FileNotFoundError(f"--pipeline: no pipeline directory at {args.pipeline}")
    pipe = SODANovelViewPipeline.from_pretrained(args.pipeline)
    if args.scheduler:
        set_scheduler(pipe, args.scheduler)
    pipe = pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    size = pipe.unet.config.sample_size
    objects = NMRObjects(args.data, split=args.split, image_size=size)
    index = pick_object(objects, args.objidx, args.object, args.seed)
    obj = objects[index]
    source_view = args.source_view
    if source_view is None:
        source_view = seeded_view(args.seed, obj["object_id"])
    elif not 0 <= source_view < NMR_NUM_VIEWS:
        raise ValueError(f"--source-view: expected 0..{NMR_NUM_VIEWS - 1}, got {source_view}")

    views = target_views(source_view)
    source = obj["images"][source_view]
    generated = generate_views_per_seed(
        pipe,
        source,
        object_target_rays(obj, source_view, size),
        view_seeds(args.seed, obj["object_id"], views),
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
    )
    orbit = torch.cat([generated[:source_view], source[None], generated[source_view:]])

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = obj["object_id"].replace("/", "-")
    paths = [out / f"{name}-{kind}" for kind in ("real.png", "source.png", "gen.png", "real.gif", "gen.gif")]
    make_grid(obj["images"], columns=8, scale=2).save(paths[0])
    make_grid(source[None], columns=1, scale=4).save(paths[1])
    make_grid(orbit, columns=8, scale=2).save(paths[2])
    save_gif(obj["images"], paths[3])
    save_gif(orbit, paths[4])
    print(
        f"{obj['object_id']} (object {index} of split {args.split!r}), source view {source_view}, "
        f"{type(pipe.scheduler).__name__} {args.steps} steps: wrote {', '.join(str(p) for p in paths)}"
    )
    return 0
