"""The ``app.py`` of a Hugging Face Space serving the demo of a pipeline on the Hub.

``soda-nvs push --space user/name`` writes this module as the Space's ``app.py``, standalone
(:func:`soda_diffusers.hub.standalone_source` inlines the demo code, so nothing imports the package),
with :data:`MODEL_ID` set to the model repo it pushed. The Space installs only the demo's requirements:
the pipeline's own code comes from the model repo (``trust_remote_code``).
"""

from __future__ import annotations

import os

import torch
from diffusers import DiffusionPipeline

from soda_diffusers.demo import build_app, launch_app

# The model repo the Space serves, written in by the export. SODA_PIPELINE overrides it: a Hub model id
# or a local pipeline folder (how the exported app is tried offline).
MODEL_ID = None


def main(model_id: str | None = None):
    model_id = model_id or os.environ.get("SODA_PIPELINE") or MODEL_ID
    if not model_id:
        raise SystemExit("app.py: no pipeline to serve; set SODA_PIPELINE to a Hub model id or a pipeline folder")
    pipe = DiffusionPipeline.from_pretrained(model_id, trust_remote_code=True)
    if torch.cuda.is_available():
        pipe = pipe.to("cuda")
    launch_app(build_app(pipe, title=f"SODA novel view synthesis: {os.path.basename(model_id.rstrip('/'))}"))


if __name__ == "__main__":
    main()
