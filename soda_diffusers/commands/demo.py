"""``soda-nvs demo``: the interactive Gradio demo in a browser (``pip install -e ".[demo]"``)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="an interactive demo in the browser (Gradio)")
    parser.add_argument("--pipeline", required=True, help="a saved pipeline directory or a Hub model id")
    parser.add_argument("--data", help="an NMR-format folder, zip or Arrow directory: pick held-out test objects")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also serve on a public gradio.live link")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from soda_diffusers import demo

    try:
        demo.require_gradio()
    except ImportError as error:
        # One line saying how to install it, not a traceback: Gradio is an optional extra.
        print(f"soda-nvs demo: {error}", file=sys.stderr)
        return 1
    import torch

    from soda_diffusers import SODANovelViewPipeline

    pipe = SODANovelViewPipeline.from_pretrained(args.pipeline)
    if torch.cuda.is_available():
        pipe = pipe.to("cuda")
    data = demo.DemoData(args.data, pipe.encoder.config.sample_size) if args.data else None
    app = demo.build_app(pipe, data)
    demo.launch_app(app, server_name=args.host, server_port=args.port, share=args.share)
    return 0
