"""The built-in synthetic NMR dataset: procedural objects rendered in the NMR rig, written in the NMR
layout, so that everything runs on a fresh machine without the 33 GB download.

The output is read by the same loaders as the real data, as a folder or as a zip archive::

    make_synthetic_nmr("synthetic-nmr", objects_per_category=20)        # a folder
    make_synthetic_nmr("synthetic-nmr.zip", 20, zip=True)                # NMR_Dataset/... in a zip
    NMRDataset(default_synthetic_dataset())                              # cached, made on first use

Every file is a pure function of ``(seed, category, object index)``: the same seed gives
byte-identical files (PNG and ``.npz``/zip entries carry no time stamps), and choosing fewer
categories does not change the objects of the others.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import yaml

from soda_diffusers.cameras import NMR_NUM_VIEWS, nmr_cameras
from soda_diffusers.data.atomic import atomic_output
from soda_diffusers.data.cache import default_cache_dir
from soda_diffusers.data.layout import (
    METADATA_FILE,
    NMR_CATEGORIES,
    NMR_IMAGE_SIZE,
    SOURCE_VIEWS_FILE,
    SPLITS,
    cameras_file,
    image_file,
    mask_file,
    resolve_categories,
    split_file,
)
from soda_diffusers.data.raytrace import Rig
from soda_diffusers.data.shapes import SyntheticShape, build_shape

# Part of the cache folder's name: bump it when a change to the generator changes its output.
SYNTHETIC_VERSION = 2  # 2: source_views.txt
ZIP_PREFIX = "NMR_Dataset/"
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass
class SyntheticObject:
    category: str
    object_id: str
    split: str
    index: int
    shape: SyntheticShape


def split_sizes(count: int) -> dict[str, int]:
    """Objects per split out of ``count``: about 80/10/10, at least one in val and test from 3 objects."""
    if count < 3:
        return {"train": count, "val": 0, "test": 0}
    held_out = max(1, round(0.1 * count))
    return {"train": count - 2 * held_out, "val": held_out, "test": held_out}


def synthetic_object_id(seed: int, category: str, index: int) -> str:
    """A ShapeNet-like 32-hex-digit id, unique per ``(seed, category, index)``."""
    return hashlib.md5(f"soda-synthetic/{seed}/{category}/{index}".encode()).hexdigest()


def synthetic_objects(
    objects_per_category: int, seed: int = 0, categories: Iterable[str] | None = None
) -> list[SyntheticObject]:
    """The objects :func:`make_synthetic_nmr` writes, with their shapes (cheap: nothing is rendered).
    ``categories``: synset ids or names, all 13 NMR categories by default."""
    if int(objects_per_category) < 1:
        raise ValueError(f"objects_per_category: expected a positive integer, got {objects_per_category}")
    positions = {synset: position for position, synset in enumerate(sorted(NMR_CATEGORIES))}
    objects = []
    for category in resolve_categories(categories, NMR_CATEGORIES, "the synthetic NMR categories"):
        index = 0
        for split, count in split_sizes(int(objects_per_category)).items():
            for _ in range(count):
                rng = np.random.default_rng([int(seed), positions[category], index])
                object_id = synthetic_object_id(seed, category, index)
                objects.append(SyntheticObject(category, object_id, split, index, build_shape(category, rng)))
                index += 1
    return objects


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """What ``np.savez`` writes, without its time stamps."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            data = io.BytesIO()
            np.lib.format.write_array(data, np.asarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_DATE), data.getvalue())
    return buffer.getvalue()


_RIG = None


def _object_files(item: SyntheticObject, cameras_npz: bytes) -> list[tuple[str, bytes]]:
    global _RIG
    if _RIG is None:
        # Every synthetic object is seen by the same 24 cameras: one set of rays per process.
        _RIG = Rig(nmr_cameras(), range(NMR_NUM_VIEWS), size=NMR_IMAGE_SIZE)
    images, masks = _RIG.render(item.shape.primitives)
    files = [(image_file(item.category, item.object_id, v), _png(images[v])) for v in range(NMR_NUM_VIEWS)]
    files += [(mask_file(item.category, item.object_id, v), _png(masks[v])) for v in range(NMR_NUM_VIEWS)]
    files.append((cameras_file(item.category, item.object_id), cameras_npz))
    return files


def _rendered(objects: list[SyntheticObject], num_workers: int) -> Iterator[list[tuple[str, bytes]]]:
    cameras_npz = npz_bytes(nmr_cameras())
    if num_workers <= 1:
        for item in objects:
            yield _object_files(item, cameras_npz)
        return
    with ProcessPoolExecutor(num_workers) as pool:
        # map keeps the objects' order, so the output does not depend on the number of workers.
        yield from pool.map(_object_files, objects, [cameras_npz] * len(objects), chunksize=4)


def _index_files(objects: list[SyntheticObject]) -> list[tuple[str, bytes]]:
    categories = sorted({item.category for item in objects})
    metadata = {synset: {"id": synset, "name": NMR_CATEGORIES[synset]} for synset in categories}
    files = [(METADATA_FILE, yaml.safe_dump(metadata, sort_keys=True).encode())]
    for synset in categories:
        for split in SPLITS:
            ids = [item.object_id for item in objects if item.category == synset and item.split == split]
            files.append((split_file(synset, split), "".join(f"{object_id}\n" for object_id in ids).encode()))
    held_out = [item for item in objects if item.split != "train"]
    lines = [f"{item.category} {item.object_id} {synthetic_source_view(item.object_id)}\n" for item in held_out]
    files.append((SOURCE_VIEWS_FILE, "".join(lines).encode()))
    return files


def synthetic_source_view(object_id: str) -> int:
    """The evaluation's source view of a held-out object: uniform over the 24 views, fixed by its id."""
    return int(hashlib.md5(f"soda-synthetic-source/{object_id}".encode()).hexdigest(), 16) % NMR_NUM_VIEWS


def make_synthetic_nmr(
    out: str | os.PathLike,
    objects_per_category: int,
    seed: int = 0,
    zip: bool = False,
    categories: Iterable[str] | None = None,
    *,
    num_workers: int = 0,
    overwrite: bool = False,
) -> Path:
    """Render a synthetic dataset in the NMR layout at ``out`` and return its path.

    ``objects_per_category`` objects of each category (all 13, or ``categories``: synset ids or
    names), split about 80/10/10 into ``softras_{train,val,test}.lst``. Each object has 24 views
    ``image/0000.png`` ... (64 x 64 RGB, white background), ``mask/0000.png`` ... and the
    ``cameras.npz`` of :func:`soda_diffusers.cameras.nmr_cameras`.

    With ``zip=True`` writes one archive (``.zip`` appended to ``out`` if missing) with the data under
    ``NMR_Dataset/``, like the real ``NMR_Dataset.zip``. ``num_workers`` > 1 renders in that many
    processes (same output). Written under a temporary name and renamed at the end.
    """
    objects = synthetic_objects(objects_per_category, seed, categories)
    out = Path(out)
    if zip and out.suffix != ".zip":
        out = out.with_name(out.name + ".zip")
    index_files = _index_files(objects)
    with atomic_output(out, kind="file" if zip else "dir", overwrite=overwrite) as partial:
        if zip:
            with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as archive:
                written_dirs = set()

                def write(member: str, data: bytes):
                    parts = (ZIP_PREFIX + member).split("/")
                    for depth in range(1, len(parts)):
                        folder = "/".join(parts[:depth]) + "/"
                        if folder not in written_dirs:
                            written_dirs.add(folder)
                            archive.writestr(zipfile.ZipInfo(folder, date_time=_FIXED_DATE), b"")
                    archive.writestr(zipfile.ZipInfo(ZIP_PREFIX + member, date_time=_FIXED_DATE), data)

                for member, data in index_files:
                    write(member, data)
                for files in _rendered(objects, num_workers):
                    for member, data in files:
                        write(member, data)
        else:

            def write(member: str, data: bytes):
                path = partial / member
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)

            for member, data in index_files:
                write(member, data)
            for files in _rendered(objects, num_workers):
                for member, data in files:
                    write(member, data)
    return out


def default_synthetic_dataset(
    objects_per_category: int = 20,
    seed: int = 0,
    *,
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
) -> Path:
    """The path of the synthetic dataset ``synthetic-v<version>-<objects_per_category>-<seed>`` in the
    cache (:func:`default_cache_dir`), rendered there on first use. Safe against concurrent first uses:
    each renders under a temporary name and the first to finish wins."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = root / f"synthetic-v{SYNTHETIC_VERSION}-{int(objects_per_category)}-{int(seed)}"
    if path.is_dir():
        return path
    try:
        make_synthetic_nmr(path, objects_per_category, seed, num_workers=num_workers)
    except FileExistsError:
        if not path.is_dir():
            raise
    return path
