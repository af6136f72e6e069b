"""The entry point of a Hugging Face Space serving the demo of a pipeline on the Hub: the Space's ``app.py``
calls :func:`main` with the model repo (:mod:`soda_diffusers.hub.space` lays the Space out).
"""

from __future__ import annotations

import os

import torch
from diffusers import DiffusionPipeline

from .demo import build_app, launch_app


def main(model_id: str | None = None):
    """Serve the pipeline ``$SODA_PIPELINE`` (a Hub model id or a local pipeline folder: how the exported app
    is tried offline), or else ``model_id``."""
    model_id = os.environ.get("SODA_PIPELINE") or model_id
    if not model_id:
        raise SystemExit("app.py: no pipeline to serve; set SODA_PIPELINE to a Hub model id or a pipeline folder")
    pipe = DiffusionPipeline.from_pretrained(model_id, trust_remote_code=True)
    if torch.cuda.is_available():
        pipe = pipe.to("cuda")
    launch_app(build_app(pipe, title=f"SODA novel view synthesis: {os.path.basename(model_id.rstrip('/'))}"))
