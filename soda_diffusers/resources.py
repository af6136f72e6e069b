"""The folders the package reads that live at the repository's top level: the presets (``pipelines/``),
the training script with its configs (``training/``) and the card templates (``model_cards/``).

A wheel carries copies of them inside the package (``soda_diffusers/presets``, ``training``,
``model_cards``: setup.cfg's ``package_dir``); a checkout, which an editable install uses, has them
beside the package. No links: a checkout where git makes none (Windows) works the same.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPOSITORY_FOLDERS = {"presets": "pipelines", "training": "training", "model_cards": "model_cards"}


def resource_dir(name: str) -> Path:
    """The folder ``name`` (a key of :data:`REPOSITORY_FOLDERS`): in the installed package, else in the checkout."""
    installed = PACKAGE_DIR / name
    return installed if installed.is_dir() else PACKAGE_DIR.parent / REPOSITORY_FOLDERS[name]
