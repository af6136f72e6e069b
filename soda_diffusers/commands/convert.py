"""``soda-nvs convert``: convert NMR-format data once into an Arrow directory for fast loading."""

from __future__ import annotations

import sys
import time


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an NMR folder or zip into a memory-mapped Arrow dataset",
        description="Convert NMR-format data (a folder, NMR_Dataset.zip, or the synthetic data) into a "
        "datasets.DatasetDict saved with save_to_disk, one row per object. Every loader accepts the result "
        "as its path and gives the same items, much faster.",
    )
    parser.add_argument("--src", required=True, help="an NMR folder, NMR_Dataset.zip or an Arrow directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--image-size", type=int, default=64, help="stored resolution, dividing 64 (default: 64)"
    )
    parser.add_argument("--categories", nargs="+", default=None, help="synset ids or names (default: all)")
    parser.add_argument("--no-masks", action="store_true", help="leave the masks out")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output once the new one is complete"
    )
    parser.set_defaults(func=run)


def run(args) -> int:
    from soda_diffusers.data import convert_to_arrow

    start = time.perf_counter()
    # cli.main reports ValueError and FileNotFoundError; an existing output is bad input too.
    try:
        out = convert_to_arrow(
            args.src,
            args.out,
            image_size=args.image_size,
            categories=args.categories,
            with_masks=not args.no_masks,
            overwrite=args.overwrite,
        )
    except FileExistsError as error:
        print(f"soda-nvs {args.command}: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0
