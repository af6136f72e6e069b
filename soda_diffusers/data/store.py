"""One split of NMR-format data at one resolution, written once as uint8 arrays on disk and read
memory-mapped: the store that training, evaluation and the quickstart read.

Decoding PNGs (or reading Arrow rows) per batch is slower than a training step on the CPU, and holding
a split in memory costs every rank the whole split (NMR's train split at 64 px: 9 GB). The store is
written once, by one process, with a progress bar; then every rank and every DataLoader worker maps
the same files, so the operating system's page cache holds one copy of the data for all of them and a
process's memory does not grow with the dataset. Plain ``.npy`` arrays rather than Arrow: a batch of
images is one fancy index into ``images.npy``, where going through ``datasets`` rows costs a Python
object per row.

A store directory holds::

    manifest.json        what it was built from (the source's fingerprint), the objects, their labels
    images.npy           (N, 24, 3, S, S) uint8, the 24 views of every object, channels first
    world_mats.npy       (N, 24, 4, 4) float64, world -> camera of every view
    unprojections.npy    (N, 24, 4, 4) float64, world_mat_inv @ camera_mat_inv of every view

It is written under a temporary name and renamed into place when complete, so a build that fails
(a corrupt image, a killed process) never leaves a store that would be used. A store whose manifest
does not match its source (other data, another resolution, another category selection, or a changed
source) is rebuilt, never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from soda_diffusers.cameras import NMR_NUM_VIEWS, view_matrices
from soda_diffusers.data.atomic import atomic_output
from soda_diffusers.data.cache import default_cache_dir
from soda_diffusers.data.errors import NMRFormatError
from soda_diffusers.data.images import area_downsample_uint8
from soda_diffusers.data.index import NMRObjectIndex

STORE_FORMAT = 1
MANIFEST_FILE = "manifest.json"
ARRAYS = ("images", "world_mats", "unprojections")


def default_store_dir() -> Path:
    return default_cache_dir() / "stores"


class ViewStore:
    """A store directory opened for reading (see the module docstring); build one with :meth:`open`.

    Attributes: ``images`` ``(N, 24, 3, S, S)`` uint8, ``world_mats`` and ``unprojections``
    ``(N, 24, 4, 4)`` float64, all memory-mapped; ``labels`` ``(N,)`` int64; ``object_ids``
    (``"<synset>/<object>"``), ``categories`` (synset ids, the labels' order), ``image_size``."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        try:
            self.manifest = json.loads((self.directory / MANIFEST_FILE).read_text())
        except (OSError, ValueError) as error:
            raise NMRFormatError(f"{self.directory}: not a readable view store ({error})") from None
        self.object_ids = self.manifest["object_ids"]
        self.labels = np.asarray(self.manifest["labels"], dtype=np.int64)
        self.categories = self.manifest["categories"]
        self.image_size = int(self.manifest["image_size"])
        self._arrays = None

    def _map(self) -> dict[str, np.ndarray]:
        # Mapped on first use, in the process that reads: a store handed to a DataLoader worker pickles
        # as its directory name and is mapped again there.
        if self._arrays is None:
            self._arrays = {name: np.load(self.directory / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        return self._arrays

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    @property
    def images(self) -> np.ndarray:
        return self._map()["images"]

    @property
    def world_mats(self) -> np.ndarray:
        return self._map()["world_mats"]

    @property
    def unprojections(self) -> np.ndarray:
        return self._map()["unprojections"]

    @property
    def num_objects(self) -> int:
        return len(self.object_ids)

    def __len__(self) -> int:
        return self.num_objects

    def mean_image(self, chunk: int = 256) -> torch.Tensor:
        """The mean of every view of every object, ``(3, S, S)`` in [-1, 1], read in chunks of objects."""
        total = np.zeros((3, self.image_size, self.image_size), dtype=np.float64)
        for start in range(0, self.num_objects, chunk):
            total += self.images[start : start + chunk].sum(axis=(0, 1), dtype=np.float64)
        mean = total / (self.num_objects * NMR_NUM_VIEWS)
        return torch.from_numpy(mean).float() / 127.5 - 1

    @classmethod
    def open(
        cls,
        data,
        split: str,
        image_size: int,
        categories: Iterable[str] | str | None = None,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> ViewStore:
        """The store of ``split`` of ``data`` (anything :func:`~soda_diffusers.data.open_storage` takes)
        at ``image_size``, built on first use under ``cache_dir`` (default ``<cache>/stores``, see
        :func:`~soda_diffusers.data.default_cache_dir`), and rebuilt when it no longer matches the data.

        In a multi-process run, call it in the main process first (``accelerator.main_process_first()``):
        the other processes then find the store complete and only open it."""
        index = NMRObjectIndex(data, split, categories, image_size)
        fingerprint = source_fingerprint(index)
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_store_dir()
        key = hashlib.sha256(json.dumps([index.storage.description, split, index.categories]).encode()).hexdigest()
        directory = root / f"{split}-{index.image_size}px-{key[:16]}"
        if (directory / MANIFEST_FILE).is_file():
            store = cls(directory)
            reason = store._mismatch(fingerprint)
            if reason is None:
                return store
            print(f"view store {directory}: {reason}; rebuilding it")
        build_store(index, directory, fingerprint, progress=progress)
        return cls(directory)

    def _mismatch(self, fingerprint: dict) -> str | None:
        """Why this store cannot stand for data with ``fingerprint``, or None when it can."""
        built = self.manifest.get("fingerprint", {})
        for key, value in fingerprint.items():
            if built.get(key) != value:
                return f"built with {key}={_short(built.get(key))}, the data now has {_short(value)}"
        arrays = self._map()
        expected = {
            "images": (self.num_objects, NMR_NUM_VIEWS, 3, self.image_size, self.image_size),
            "world_mats": (self.num_objects, NMR_NUM_VIEWS, 4, 4),
            "unprojections": (self.num_objects, NMR_NUM_VIEWS, 4, 4),
        }
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                return f"{name}.npy has shape {arrays[name].shape}, expected {shape}"
        return None


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def source_fingerprint(index: NMRObjectIndex) -> dict:
    """What a store depends on: the format, the resolution, the objects and their labels, and the
    source's own files (their sizes and modification times, or the Arrow tables' fingerprints)."""
    object_ids = json.dumps([index.object_ids, index.labels]).encode()
    return {
        "format": STORE_FORMAT,
        "source": index.storage.description,
        "image_size": index.image_size,
        "split": index.split,
        "categories": list(index.categories),
        "objects": hashlib.sha256(object_ids).hexdigest(),
        "source_files": index.storage.fingerprint(),
    }


def build_store(index: NMRObjectIndex, directory: Path, fingerprint: dict, progress: bool = True) -> None:
    """Write the store of ``index`` to ``directory``, one object at a time: memory stays flat whatever
    the split's size."""
    storage, size, count = index.storage, index.image_size, index.num_objects
    shapes = {
        "images": ((count, NMR_NUM_VIEWS, 3, size, size), np.uint8),
        "world_mats": ((count, NMR_NUM_VIEWS, 4, 4), np.float64),
        "unprojections": ((count, NMR_NUM_VIEWS, 4, 4), np.float64),
    }
    with atomic_output(directory, overwrite=True) as partial:
        handles = {}
        try:
            for name, (shape, dtype) in shapes.items():
                handles[name] = open(partial / f"{name}.npy", "wb")
                header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(handles[name], header)
            objects = tqdm(index.object_ids, desc=f"building the {index.split} view store ({size} px)",
                           unit="object", disable=not progress)
            for name in objects:
                synset, object_id = name.split("/", 1)
                images = np.stack([_read_view(storage, synset, object_id, view) for view in range(NMR_NUM_VIEWS)])
                images = area_downsample_uint8(images, size).transpose(0, 3, 1, 2)
                try:
                    cameras = storage.read_cameras(synset, object_id)
                    matrices = [view_matrices(cameras, view) for view in range(NMR_NUM_VIEWS)]
                except (NMRFormatError, FileNotFoundError, ValueError) as error:
                    raise NMRFormatError(f"object {name}: {error}") from None
                handles["images"].write(np.ascontiguousarray(images).tobytes())
                handles["world_mats"].write(np.stack([m[0] for m in matrices]).astype(np.float64).tobytes())
                handles["unprojections"].write(np.stack([m[1] for m in matrices]).astype(np.float64).tobytes())
        finally:
            for handle in handles.values():
                handle.close()
        manifest = {
            "fingerprint": fingerprint,
            "object_ids": index.object_ids,
            "labels": index.labels,
            "categories": list(index.categories),
            "category_names": list(index.category_names),
            "image_size": size,
        }
        # The manifest last: a directory without one is never opened as a store.
        (partial / MANIFEST_FILE).write_text(json.dumps(manifest))


def _read_view(storage, synset: str, object_id: str, view: int) -> np.ndarray:
    try:
        return storage.read_images(synset, object_id, [view])[0]
    except (NMRFormatError, FileNotFoundError) as error:
        raise type(error)(f"object {synset}/{object_id}, view {view}: {error}") from None
