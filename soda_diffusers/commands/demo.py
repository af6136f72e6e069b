"""``soda-nvs demo``: the interactive Gradio demo in a browser (``pip install -e ".[demo]"``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import PIL.Image


class DemoData:
    """Held-out NMR objects to pick a source view from (``soda-nvs demo --data``)."""

    def __init__(self, path: str | Path, image_size: int):
        from soda_diffusers.data import NMRObjects

        self.objects = NMRObjects(path, split="test", image_size=image_size, store=True)
        self.image_size = image_size
        self.object_ids = self.objects.object_ids

    def item(self, object_id: str) -> dict:
        return self.objects[self.object_ids.index(object_id)]

    def gallery(self, object_id: str) -> list[tuple[PIL.Image.Image, str]]:
        from soda_diffusers.demo import model_to_pil

        images = self.item(object_id)["images"]
        return [(model_to_pil(images[view]), f"view {view}") for view in range(images.shape[0])]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="an interactive demo in the browser (Gradio)")
    parser.add_argument("--pipeline", required=True, help="a saved pipeline directory or a Hub model id")
    parser.add_argument("--data", help="an NMR-format folder, zip or Arrow directory: pick held-out test objects")
    parser.add_argument("--host", help="address to serve on (default: $GRADIO_SERVER_NAME, else 127.0.0.1: this "
                        "machine only)")
    parser.add_argument("--port", type=int, help="port (default: $GRADIO_SERVER_PORT, else 7860)")
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
    data = DemoData(args.data, pipe.encoder.config.sample_size) if args.data else None
    app = demo.build_app(pipe, data)
    demo.launch_app(app, server_name=args.host, server_port=args.port, share=args.share)
    return 0
