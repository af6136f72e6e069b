"""From what a user names to the storage that reads it: :func:`open_storage` takes an NMR folder,
``NMR_Dataset.zip``, an Arrow directory or a Hugging Face Hub dataset id and returns the matching
backend of :mod:`soda_diffusers.data.storage` or :mod:`soda_diffusers.data.arrow`.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

from soda_diffusers.data.arrow import ArrowStorage, is_arrow_dataset
from soda_diffusers.data.errors import NMRFormatError, short_error
from soda_diffusers.data.layout import METADATA_FILE
from soda_diffusers.data.storage import FolderStorage, NMRStorage, ZipStorage, find_dataset_root

# A Hugging Face Hub repository id: "owner/name", letters, digits, "-", "_" and ".".
HUB_DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def looks_like_hub_id(data) -> bool:
    """Whether ``data`` names a Hub dataset rather than local files: ``owner/name``, and no such path."""
    return (
        isinstance(data, str) and HUB_DATASET_ID.fullmatch(data) is not None and not Path(data).exists()
    )


def open_hub_dataset(dataset_id: str) -> NMRStorage:
    """A Hub dataset pushed by :func:`~soda_diffusers.data.push_dataset_to_hub`, downloaded once into the
    ``datasets`` cache and then read memory-mapped like an Arrow directory."""
    import datasets

    try:
        dataset_dict = datasets.load_dataset(dataset_id)
    except Exception as error:
        # Whatever the Hub or the network raised: name the id, in case a local path was meant.
        raise FileNotFoundError(
            f"{dataset_id}: no such local file or directory, and loading it as a Hugging Face Hub dataset "
            f"failed ({short_error(error)})"
        ) from error
    return ArrowStorage.from_dataset_dict(dataset_dict, dataset_id)


def open_storage(path: str | os.PathLike) -> NMRStorage:
    """The storage behind ``path``: an NMR folder, ``NMR_Dataset.zip``, an Arrow directory written
    by :func:`~soda_diffusers.data.convert_to_arrow`, or a Hugging Face Hub dataset id (``owner/name``)
    pushed by :func:`~soda_diffusers.data.push_dataset_to_hub`. Storages pass through unchanged."""
    if isinstance(path, NMRStorage):
        return path
    if looks_like_hub_id(path):
        return open_hub_dataset(path)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such file or directory (expected an NMR folder, NMR_Dataset.zip or an Arrow directory)"
        )
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise NMRFormatError(
                f"{path}: not a zip archive, truncated or corrupt? (expected NMR_Dataset.zip)"
            )
        return ZipStorage(path)
    if is_arrow_dataset(path):
        return ArrowStorage(path)
    root = find_dataset_root(path)
    if root is None:
        raise NMRFormatError(
            f"{path}: not an NMR dataset (expected {METADATA_FILE} and <category>/softras_<split>.lst files, "
            "a zip archive, or an Arrow directory written by `soda-nvs convert`)"
        )
    return FolderStorage(root)
