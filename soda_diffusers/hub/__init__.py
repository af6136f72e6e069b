"""Sharing SODA on the Hugging Face Hub, one job a module:

* :mod:`~soda_diffusers.hub.export`: a pipeline's model repo: the folder to upload, its upload, and
  loading it back with this package's classes;
* :mod:`~soda_diffusers.hub.bundle`: the package's source files that folder ships, as they are, so that it
  loads without the package;
* :mod:`~soda_diffusers.hub.cards`: the model card and the dataset card;
* :mod:`~soda_diffusers.hub.space`: a Gradio Space serving the demo of a model repo.
"""

# The Hub client calls of export.py and space.py go through these names: the one place to swap them.
from huggingface_hub import create_repo, upload_folder  # noqa: F401

from soda_diffusers.hub.bundle import bundled_files, bundled_sources
from soda_diffusers.hub.cards import find_samples, preset_name, render_dataset_card, render_model_card
from soda_diffusers.hub.export import (
    HubUploadError,
    export_for_hub,
    load_pipeline,
    new_or_empty_folder,
    package_layout,
    push_to_hub,
)
from soda_diffusers.hub.space import SPACE_FILES, export_space, push_space, render_space_card

__all__ = [
    "SPACE_FILES",
    "HubUploadError",
    "bundled_files",
    "bundled_sources",
    "export_for_hub",
    "export_space",
    "find_samples",
    "load_pipeline",
    "new_or_empty_folder",
    "package_layout",
    "preset_name",
    "push_space",
    "push_to_hub",
    "render_dataset_card",
    "render_model_card",
    "render_space_card",
]
