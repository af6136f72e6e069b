"""``soda-nvs generate``: an orbit of novel views from one source image."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from soda_diffusers.cameras import NMR_AZIMUTH_STEP_DEG, NMR_NUM_VIEWS, orbit_rays


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate an orbit of novel views from one source image")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--pipeline", help="a saved pipeline directory (save_pretrained)")
    model.add_argument("--preset", default="soda-tiny", help="an untrained preset (default: soda-tiny)")
    parser.add_argument("--source", help="source image file (default: a built-in drawing)")
    parser.add_argument("--source-azimuth", type=float, default=0.0, help="azimuth of the source camera, degrees")
    parser.add_argument("--views", type=int, default=NMR_NUM_VIEWS, help="views around the orbit (default 24)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/generate", help="output directory")
    parser.set_defaults(func=run)


def default_source(size: int = 64) -> PIL.Image.Image:
    """A shaded disc on white: something to look at when no source image is given."""
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    inside = x**2 + y**2 < 0.45
    shade = np.clip(0.4 + 0.6 * (1 - (x + 0.3) ** 2 - (y + 0.3) ** 2), 0, 1)
    image = np.ones((size, size, 3))
    image[inside] = shade[inside, None] * np.array([0.8, 0.3, 0.2])
    return PIL.Image.fromarray(np.round(image * 255).astype(np.uint8))


def run(args: argparse.Namespace) -> int:
    from soda_diffusers import SODANovelViewPipeline
    from soda_diffusers.visualize import make_grid, save_gif

    if args.pipeline:
        pipe = SODANovelViewPipeline.from_pretrained(args.pipeline)
    else:
        pipe = SODANovelViewPipeline.from_preset(args.preset)
    if args.source:
        if not Path(args.source).is_file():
            raise FileNotFoundError(f"--source: no image file at {args.source}")
        source = PIL.Image.open(args.source).convert("RGB")
    else:
        source = default_source()
    azimuths = [args.source_azimuth + NMR_AZIMUTH_STEP_DEG * 24 / args.views * i for i in range(args.views)]
    rays = orbit_rays(azimuths, size=pipe.unet.config.sample_size, source_azimuth_deg=args.source_azimuth)
    generator = [torch.Generator().manual_seed(args.seed + i) for i in range(args.views)]
    images = pipe(source, rays, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generator).images

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source.save(out / "source.png")
    make_grid(images, columns=8, scale=2).save(out / "views.png")
    save_gif(images, out / "orbit.gif")
    print(f"wrote {out / 'source.png'}, {out / 'views.png'} and {out / 'orbit.gif'} ({args.views} views)")
    return 0
