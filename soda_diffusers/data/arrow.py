"""NMR data as Arrow tables with Hugging Face ``datasets``, read memory-mapped: the format and its
storage, :class:`ArrowStorage` (:mod:`soda_diffusers.data.convert` writes it).

The converted directory is a :class:`datasets.DatasetDict` saved with ``save_to_disk``, one
``Dataset`` per split (``train``, ``val``, ``test``), one row per object:

* ``object_id`` (``"<synset>/<object>"``), ``category`` (synset id), ``category_name``, ``split``;
* ``label``: a ``ClassLabel`` over the converted categories' synset ids (sorted);
* ``images``: ``Array4D((24, S, S, 3), "uint8")``, the 24 views;
* ``masks``: ``Array3D((24, S, S), "uint8")`` (unless converted with ``with_masks=False``);
* ``world_mat``, ``world_mat_inv``, ``camera_mat``, ``camera_mat_inv``: ``Array3D((24, 4, 4), "float64")``.

Load it with ``datasets.load_from_disk(path)`` or pass the directory to the readers of
:mod:`soda_diffusers.data`, which give the very same items as from the original files at the
converted size ``S`` (smaller sizes are area-downsampled from the stored ``S`` px, so they can differ
from a downsampling of the original 64 px by one rounding step).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from soda_diffusers.cameras import CAMERA_KEYS, NMR_NUM_VIEWS
from soda_diffusers.data.errors import NMRFormatError
from soda_diffusers.data.layout import check_split
from soda_diffusers.data.storage import NMRStorage

REQUIRED_COLUMNS = ("object_id", "category", "category_name", "images", *CAMERA_KEYS)


def is_arrow_dataset(path: str | os.PathLike) -> bool:
    return (Path(path) / "dataset_dict.json").is_file()


def nmr_features(image_size: int, categories: Sequence[str], with_masks: bool = True):
    """The ``datasets.Features`` of the format (see the module docstring) at ``image_size`` px."""
    import datasets

    views = NMR_NUM_VIEWS
    features = {
        "object_id": datasets.Value("string"),
        "category": datasets.Value("string"),
        "category_name": datasets.Value("string"),
        "label": datasets.ClassLabel(names=list(categories)),
        "split": datasets.Value("string"),
        "images": datasets.Array4D((views, image_size, image_size, 3), "uint8"),
    }
    if with_masks:
        features["masks"] = datasets.Array3D((views, image_size, image_size), "uint8")
    for key in CAMERA_KEYS:
        features[key] = datasets.Array3D((views, 4, 4), "float64")
    return datasets.Features(features)


class ArrowStorage(NMRStorage):
    """NMR data as a ``DatasetDict`` of splits (see the module docstring), memory-mapped: an Arrow
    directory written by :func:`~soda_diffusers.data.convert_to_arrow`, or one already loaded
    (:meth:`from_dataset_dict`, e.g. a Hub dataset from ``datasets.load_dataset``)."""

    def __init__(self, path: str | os.PathLike):
        import datasets

        try:
            dataset_dict = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as error:
            raise NMRFormatError(f"{path}: cannot load this Arrow dataset directory ({error})") from None
        self._index(dataset_dict, str(path))

    @classmethod
    def from_dataset_dict(cls, dataset_dict, description: str) -> ArrowStorage:
        """A storage over ``dataset_dict``; ``description`` names it in messages and store manifests."""
        storage = cls.__new__(cls)
        storage._index(dataset_dict, description)
        return storage

    def _index(self, dataset_dict, description: str) -> None:
        import datasets

        self.description = description
        if not isinstance(dataset_dict, datasets.DatasetDict):
            raise NMRFormatError(
                f"{description}: expected a DatasetDict of splits written by convert_to_arrow, got "
                f"{type(dataset_dict).__name__}"
            )
        self.splits = {}
        self._columns = {}
        self._rows = {}
        self._object_ids = {}
        self._categories = {}
        self.image_size = None
        for split, dataset in dataset_dict.items():
            missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
            if missing:
                raise NMRFormatError(
                    f"{description}: split {split!r} lacks the columns {missing} "
                    f"(expected {list(REQUIRED_COLUMNS)})"
                )
            shape = tuple(getattr(dataset.features["images"], "shape", ()))
            if len(shape) != 4 or shape[0] != NMR_NUM_VIEWS or shape[1] != shape[2] or shape[3] != 3:
                raise NMRFormatError(
                    f"{description}: split {split!r}: 'images' should be (24, S, S, 3), got {shape}"
                )
            if self.image_size not in (None, shape[1]):
                raise NMRFormatError(
                    f"{description}: splits hold images of different sizes ({self.image_size} and {shape[1]})"
                )
            self.image_size = shape[1]
            self.splits[split] = dataset
            categories = dataset["category"]
            names = dataset["category_name"]
            object_ids = dataset["object_id"]
            per_category = {}
            for row, (synset, name, object_id) in enumerate(zip(categories, names, object_ids)):
                self._categories.setdefault(synset, name)
                short = object_id.split("/", 1)[-1]
                per_category.setdefault(synset, []).append(short)
                self._rows.setdefault((synset, short), (split, row))
            self._object_ids[split] = per_category
        if not self._categories:
            raise NMRFormatError(f"{description}: the Arrow dataset holds no objects")

    def categories(self) -> dict[str, str]:
        return dict(sorted(self._categories.items()))

    def fingerprint(self) -> dict:
        return {split: dataset._fingerprint for split, dataset in sorted(self.splits.items())}

    def object_ids(self, category: str, split: str) -> list[str]:
        check_split(split)
        if split not in self._object_ids:
            raise NMRFormatError(f"{self.description}: no split {split!r} (found {sorted(self._object_ids)})")
        return list(self._object_ids[split].get(category, []))

    def __getstate__(self):
        state = self.__dict__.copy()
        # The column views point into this process's memory maps; the Datasets themselves pickle
        # by file name and are mapped again on the other side.
        state["_columns"] = {}
        return state

    def _column(self, split: str, name: str) -> _ColumnView:
        key = (split, name)
        if key not in self._columns:
            dataset = self.splits[split]
            if name not in dataset.column_names:
                raise NMRFormatError(
                    f"{self.description}: split {split!r} has no column {name!r} "
                    "(converted with with_masks=False?)"
                )
            self._columns[key] = _ColumnView(dataset, name)
        return self._columns[key]

    def _locate(self, category: str, object_id: str) -> tuple[str, int]:
        try:
            return self._rows[(category, object_id)]
        except KeyError:
            raise FileNotFoundError(f"{self.description}: no object {category}/{object_id}") from None

    def read_images(self, category: str, object_id: str, views: Sequence[int]) -> np.ndarray:
        split, row = self._locate(category, object_id)
        return self._column(split, "images").row(row)[list(views)]

    def read_masks(self, category: str, object_id: str, views: Sequence[int]) -> np.ndarray:
        split, row = self._locate(category, object_id)
        return self._column(split, "masks").row(row)[list(views)]

    def read_cameras(
        self, category: str, object_id: str, views: Sequence[int] | None = None
    ) -> dict[str, np.ndarray]:
        views = range(NMR_NUM_VIEWS) if views is None else views
        split, row = self._locate(category, object_id)
        matrices = {key: self._column(split, key).row(row) for key in CAMERA_KEYS}
        return {
            f"{key}_{view}": matrices[key][view].astype(np.float64) for view in views for key in CAMERA_KEYS
        }


class _ColumnView:
    """A fixed-shape array column of a memory-mapped Dataset as numpy views, one per Arrow chunk,
    without copying: reading a row is an index into the memory map. (Going through
    ``Dataset.__getitem__`` and its formatters costs milliseconds per row, more than decoding PNGs.)"""

    def __init__(self, dataset, name: str):
        if dataset._indices is not None:
            dataset = dataset.flatten_indices()
        feature = dataset.features[name]
        shape = tuple(feature.shape)
        self.chunks = []
        starts = [0]
        for chunk in dataset.data.column(name).chunks:
            # Array<N>D columns are stored as N nested lists: flattening them leaves the values.
            values = getattr(chunk, "storage", chunk)
            for _ in shape:
                values = values.flatten()
            self.chunks.append(values.to_numpy(zero_copy_only=True).reshape(len(chunk), *shape))
            starts.append(starts[-1] + len(chunk))
        self.starts = np.asarray(starts)

    def row(self, row: int) -> np.ndarray:
        chunk = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.chunks[chunk][row - self.starts[chunk]]
