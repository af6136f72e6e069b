"""``soda-nvs make-synthetic``: render the built-in synthetic dataset in the NMR layout."""

from __future__ import annotations

import sys
import time


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-synthetic",
        help="render a synthetic dataset in the NMR layout (folder or zip)",
        description="Render procedural objects of the 13 NMR categories in the NMR camera rig, written in the "
        "NMR layout (metadata.yaml, softras_{train,val,test}.lst, image/, mask/, cameras.npz). "
        "The same seed gives byte-identical files.",
    )
    parser.add_argument("--out", required=True, help="output folder (or zip file with --zip)")
    parser.add_argument(
        "--objects-per-category", type=int, required=True, help="objects per category, split about 80/10/10"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--zip", action="store_true", help="write one zip archive with the data under NMR_Dataset/"
    )
    parser.add_argument("--categories", nargs="+", default=None, help="synset ids or names (default: all 13)")
    parser.add_argument(
        "--num-workers", type=int, default=0, help="render in this many processes (default: in this one)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output once the new one is complete"
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from soda_diffusers.data import make_synthetic_nmr

    start = time.perf_counter()
    # cli.main reports ValueError and FileNotFoundError; an existing output is bad input too.
    try:
        out = make_synthetic_nmr(
            args.out,
            args.objects_per_category,
            seed=args.seed,
            zip=args.zip,
            categories=args.categories,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
        )
    except FileExistsError as error:
        print(f"soda-nvs {args.command}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0
