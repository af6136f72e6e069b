"""Write NMR-format data as Arrow: :func:`convert_to_arrow` turns a folder, a zip, the synthetic data
or another Arrow directory into the format of :mod:`soda_diffusers.data.arrow`, and
:func:`push_dataset_to_hub` uploads the result to the Hugging Face Hub.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from soda_diffusers.cameras import CAMERA_KEYS, NMR_NUM_VIEWS
from soda_diffusers.data.arrow import is_arrow_dataset, nmr_features
from soda_diffusers.data.atomic import atomic_output
from soda_diffusers.data.errors import NMRFormatError
from soda_diffusers.data.images import area_downsample_uint8, check_image_size
from soda_diffusers.data.layout import SPLITS, check_split, resolve_categories
from soda_diffusers.data.sources import open_storage
from soda_diffusers.data.storage import NMRStorage


def _rows(
    storage: NMRStorage,
    split: str,
    categories: list[str],
    names: dict[str, str],
    image_size: int,
    with_masks: bool,
):
    """The rows of ``split``, one object at a time (for ``datasets.Dataset.from_generator``)."""
    views = range(NMR_NUM_VIEWS)
    for label, synset in enumerate(categories):
        for object_id in storage.object_ids(synset, split):
            cameras = storage.read_cameras(synset, object_id)
            row = {
                "object_id": f"{synset}/{object_id}",
                "category": synset,
                "category_name": names[synset],
                "label": label,
                "split": split,
                "images": area_downsample_uint8(storage.read_images(synset, object_id, views), image_size),
            }
            if with_masks:
                row["masks"] = area_downsample_uint8(
                    storage.read_masks(synset, object_id, views), image_size, channels_last=False
                )
            for key in CAMERA_KEYS:
                row[key] = np.stack([cameras[f"{key}_{view}"] for view in views])
            yield row


def convert_to_arrow(
    src,
    out: str | os.PathLike,
    image_size: int = 64,
    *,
    categories: Iterable[str] | str | None = None,
    splits: Sequence[str] = SPLITS,
    with_masks: bool = True,
    overwrite: bool = False,
) -> Path:
    """Convert NMR-format data (a folder, ``NMR_Dataset.zip``, the synthetic data, or another Arrow
    directory) into an Arrow ``DatasetDict`` directory at ``out`` (the format of
    :mod:`soda_diffusers.data.arrow`).

    Written to a temporary sibling directory and renamed at the end: a failure part-way leaves an
    existing ``out`` as it was. An existing ``out`` is an error unless ``overwrite``.
    """
    import datasets

    storage = open_storage(src)
    out = Path(out)
    image_size = check_image_size(image_size, storage.image_size, storage.description)
    available = storage.categories()
    categories = resolve_categories(categories, available, storage.description)
    splits = [check_split(split) for split in splits]
    features = nmr_features(image_size, categories, with_masks)
    with atomic_output(out, overwrite=overwrite) as partial:
        cache_dir = partial / "cache"
        converted = {}
        for split in splits:
            kwargs = {
                "storage": storage,
                "split": split,
                "categories": categories,
                "names": available,
                "image_size": image_size,
                "with_masks": with_masks,
            }
            if not any(storage.object_ids(synset, split) for synset in categories):
                converted[split] = datasets.Dataset.from_dict(
                    {name: [] for name in features}, features=features
                )
                continue
            try:
                converted[split] = datasets.Dataset.from_generator(
                    _rows,
                    features=features,
                    gen_kwargs=kwargs,
                    cache_dir=str(cache_dir),
                    keep_in_memory=False,
                )
            except datasets.exceptions.DatasetGenerationError as error:
                # datasets wraps whatever the generator raised: report our clear error, not its wrapper.
                cause = error.__cause__ or error.__context__
                if isinstance(cause, (ValueError, FileNotFoundError)):
                    raise cause from None
                raise
        datasets.DatasetDict(converted).save_to_disk(str(partial / "dataset"))
        # save_to_disk copied the tables: the generator's cache can go, and the dataset moves up.
        converted.clear()
        shutil.rmtree(cache_dir, ignore_errors=True)
        for entry in (partial / "dataset").iterdir():
            entry.rename(partial / entry.name)
        (partial / "dataset").rmdir()
    return out


def push_dataset_to_hub(
    arrow_dir: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None
):
    """Upload an Arrow directory written by :func:`convert_to_arrow` to the Hugging Face Hub with
    ``DatasetDict.push_to_hub``. Needs a token: ``token=``, ``HF_TOKEN`` or ``huggingface-cli login``."""
    import datasets
    import huggingface_hub

    if token is None and huggingface_hub.get_token() is None:
        raise ValueError(
            f"push_dataset_to_hub({repo_id!r}): no Hugging Face token found; pass token=..., set HF_TOKEN "
            "or run `huggingface-cli login`"
        )
    if not is_arrow_dataset(arrow_dir):
        raise NMRFormatError(
            f"{arrow_dir}: not an Arrow directory written by convert_to_arrow (no dataset_dict.json)"
        )
    return datasets.load_from_disk(str(arrow_dir)).push_to_hub(repo_id, private=private, token=token)
