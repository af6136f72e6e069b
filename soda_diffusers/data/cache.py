"""The folder where the data layer keeps what it makes once and reuses: synthetic datasets and view stores."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$SODA_DIFFUSERS_CACHE``, else ``~/.cache/soda_diffusers``."""
    root = os.environ.get("SODA_DIFFUSERS_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "soda_diffusers"
