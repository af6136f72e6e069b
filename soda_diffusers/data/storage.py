"""Read NMR-format data from where it is stored: :class:`NMRStorage`, what every storage answers, and
its file backends, an extracted folder or ``NMR_Dataset.zip`` read in place (the Arrow backend is
:mod:`soda_diffusers.data.arrow`; :func:`~soda_diffusers.data.sources.open_storage` picks one for a path).
Every storage answers the same questions: which categories, which objects of a split, an object's
images, masks and cameras, all at the stored resolution. Resizing, view choice and tensors are the
readers' business (:mod:`soda_diffusers.data.index` and above).
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import yaml

from soda_diffusers.cameras import CAMERA_KEYS, NMR_NUM_VIEWS
from soda_diffusers.data.errors import NMRFormatError
from soda_diffusers.data.layout import (
    METADATA_FILE,
    NMR_IMAGE_SIZE,
    SOURCE_VIEWS_FILE,
    SPLITS,
    cameras_file,
    check_split,
    image_file,
    mask_file,
    parse_view_list,
    split_file,
)


class NMRStorage:
    """What the loaders need from stored NMR data. ``image_size`` is the stored resolution."""

    image_size: int = NMR_IMAGE_SIZE
    description: str

    def categories(self) -> dict[str, str]:
        """Synset id -> category name as stored (ShapeNet names may list synonyms: "car,auto"), sorted by id."""
        raise NotImplementedError

    def object_ids(self, category: str, split: str) -> list[str]:
        """Object ids (without the category) of one category's split, in stored order."""
        raise NotImplementedError

    def read_images(self, category: str, object_id: str, views: Sequence[int]) -> np.ndarray:
        """``(len(views), S, S, 3)`` uint8 RGB."""
        raise NotImplementedError

    def read_masks(self, category: str, object_id: str, views: Sequence[int]) -> np.ndarray:
        """``(len(views), S, S)`` uint8, 0 background."""
        raise NotImplementedError

    def read_cameras(
        self, category: str, object_id: str, views: Sequence[int] | None = None
    ) -> dict[str, np.ndarray]:
        """``world_mat_i``, ``world_mat_inv_i``, ``camera_mat_i``, ``camera_mat_inv_i`` of ``views``
        (all 24 by default) as float64 ``(4, 4)`` arrays."""
        raise NotImplementedError

    def source_views(self) -> dict[str, int] | None:
        """The evaluation's source views stored with the data (``source_views.txt``, a pixelNeRF view
        list), ``{"<synset>/<object>": view}``, or None when the data has none."""
        return None

    def fingerprint(self) -> dict:
        """What changes when the stored data changes (file sizes and times, table fingerprints): a
        cache built from this storage (:class:`~soda_diffusers.data.store.ViewStore`) keeps it and is
        rebuilt when it differs."""
        raise NotImplementedError


def _file_stamp(path) -> list[int]:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns]


class _FileStorage(NMRStorage):
    """The NMR file layout, stored as files under a root: a folder or a zip archive."""

    def __init__(self):
        self._categories = None

    # Subclasses say how to read a member (a '/'-separated path below the dataset root).
    def _read_bytes(self, member: str) -> bytes:
        raise NotImplementedError

    def _has(self, member: str) -> bool:
        raise NotImplementedError

    def _category_folders(self) -> list[str]:
        raise NotImplementedError

    def _where(self, member: str) -> str:
        raise NotImplementedError

    def categories(self) -> dict[str, str]:
        if self._categories is None:
            self._categories = self._read_categories()
        return dict(self._categories)

    def _read_categories(self) -> dict[str, str]:
        if not self._has(METADATA_FILE):
            # metadata.yaml only adds names: like DVR's loader, fall back to the category folders.
            return {synset: synset for synset in sorted(self._category_folders())}
        where = self._where(METADATA_FILE)
        try:
            # BaseLoader keeps every scalar a string: YAML 1.1 would read 04256520 as an octal integer.
            metadata = yaml.load(self._read_bytes(METADATA_FILE), Loader=yaml.BaseLoader)
        except yaml.YAMLError as error:
            raise NMRFormatError(f"{where}: not valid YAML ({error})") from None
        if not isinstance(metadata, dict) or not metadata:
            raise NMRFormatError(
                f"{where}: expected a mapping {{synset: {{id, name}}}}, got {type(metadata).__name__}"
            )
        categories = {}
        for synset, entry in metadata.items():
            if not isinstance(entry, dict):
                raise NMRFormatError(f"{where}: entry {synset!r} should be a mapping with 'id' and 'name'")
            categories[str(synset)] = str(entry.get("name", synset))
        return dict(sorted(categories.items()))

    def source_views(self) -> dict[str, int] | None:
        if not self._has(SOURCE_VIEWS_FILE):
            return None
        try:
            text = self._read_bytes(SOURCE_VIEWS_FILE).decode("utf-8")
        except UnicodeDecodeError as error:
            raise NMRFormatError(f"{self._where(SOURCE_VIEWS_FILE)}: not a text file ({error})") from None
        return parse_view_list(text, self._where(SOURCE_VIEWS_FILE))

    def object_ids(self, category: str, split: str) -> list[str]:
        member = split_file(category, check_split(split))
        text = self._read_bytes(member)
        try:
            lines = text.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise NMRFormatError(f"{self._where(member)}: expected a text file of object ids") from None
        return [line.strip() for line in lines if line.strip()]

    def read_images(self, category: str, object_id: str, views: Sequence[int]) -> np.ndarray:
        return np.stack([self._read_png(image_file(category, object_id, v), mode="RGB") for v in views])

    def read_masks(self, category: str, object_id: str, views: Sequence[int]) -> np.ndarray:
        return np.stack([self._read_png(mask_file(category, object_id, v), mode="mask") for v in views])

    def _read_png(self, member: str, mode: str) -> np.ndarray:
        data = self._read_bytes(member)
        try:
            with PIL.Image.open(io.BytesIO(data)) as image:
                image.load()
                if mode == "RGB":
                    array = np.asarray(image.convert("RGB"))
                else:
                    array = np.asarray(image)
                    if array.ndim == 3:
                        array = array[..., 0]
                    array = array.astype(np.uint8, copy=False)
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
            raise NMRFormatError(f"{self._where(member)}: not a readable PNG image ({error})") from None
        expected = (self.image_size, self.image_size)
        if array.shape[:2] != expected:
            raise NMRFormatError(
                f"{self._where(member)}: expected a {expected[0]}x{expected[1]} image, got {array.shape[1]}x{array.shape[0]}"
            )
        return array

    def read_cameras(
        self, category: str, object_id: str, views: Sequence[int] | None = None
    ) -> dict[str, np.ndarray]:
        member = cameras_file(category, object_id)
        where = self._where(member)
        views = range(NMR_NUM_VIEWS) if views is None else views
        data = self._read_bytes(member)
        try:
            npz = np.load(io.BytesIO(data))
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise NMRFormatError(f"{where}: not a readable .npz file ({error})") from None
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise NMRFormatError(f"{where}: expected an .npz archive of camera matrices, got a single array")
        with npz:
            try:
                return _camera_dict(npz, views, where)
            except NMRFormatError:
                raise
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
                raise NMRFormatError(f"{where}: cannot read its arrays ({error})") from None


def _camera_dict(npz, views: Sequence[int], where: str) -> dict[str, np.ndarray]:
    """The four camera matrices of ``views`` from a ``cameras.npz`` mapping, inverses computed where absent."""
    cameras = {}
    for view in views:
        for key in ("world_mat", "camera_mat"):
            name = f"{key}_{view}"
            if name not in npz:
                raise NMRFormatError(
                    f"{where}: missing key {name!r} (expected world_mat_i and camera_mat_i for i in 0..23)"
                )
            matrix = np.asarray(npz[name], dtype=np.float64)
            if matrix.shape != (4, 4):
                raise NMRFormatError(f"{where}: {name!r} should be a 4x4 matrix, got shape {matrix.shape}")
            cameras[name] = matrix
        for key in ("world_mat", "camera_mat"):
            name = f"{key}_inv_{view}"
            if name in npz:
                cameras[name] = np.asarray(npz[name], dtype=np.float64).reshape(4, 4)
            else:
                cameras[name] = np.linalg.inv(cameras[f"{key}_{view}"])
    return {f"{key}_{view}": cameras[f"{key}_{view}"] for view in views for key in CAMERA_KEYS}


class FolderStorage(_FileStorage):
    """An extracted NMR folder (the one holding ``metadata.yaml`` and the category folders)."""

    def __init__(self, root: str | os.PathLike):
        super().__init__()
        self.root = Path(root)
        self.description = str(self.root)

    def _where(self, member: str) -> str:
        return str(self.root / member)

    def _has(self, member: str) -> bool:
        return (self.root / member).is_file()

    def _read_bytes(self, member: str) -> bytes:
        path = self.root / member
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file ({_expected(member)})") from None
        except IsADirectoryError:
            raise NMRFormatError(f"{path}: is a directory, expected a file ({_expected(member)})") from None

    def fingerprint(self) -> dict:
        # The split lists and the metadata: a dataset written again (the synthetic data is replaced
        # whole) or re-split shows there; stat-ing two million images would take longer than a build.
        lists = sorted(self.root.glob("*/softras_*.lst")) + sorted(self.root.glob(METADATA_FILE))
        return {str(path.relative_to(self.root)): _file_stamp(path) for path in lists}

    def _category_folders(self) -> list[str]:
        return [
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and any((p / f"softras_{s}.lst").is_file() for s in SPLITS)
        ]


class ZipStorage(_FileStorage):
    """``NMR_Dataset.zip`` read in place. The dataset may sit under a top-level folder of the
    archive (``NMR_Dataset/``), found automatically.

    Each process opens its own handle (a ``ZipFile`` shares one file position, which a forked
    DataLoader worker must not share with its parent); handles are cached per process id.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)
        self.description = str(self.path)
        self._handles = {}
        # The usual layouts first: listing the 2 million members of the real archive takes seconds.
        self.prefix = None
        for prefix in ("NMR_Dataset/", ""):
            self.prefix = prefix
            if self._has(METADATA_FILE):
                break
        else:
            self.prefix = _find_prefix(self._zip().namelist(), self.description)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _zip(self) -> zipfile.ZipFile:
        pid = os.getpid()
        handle = self._handles.get(pid)
        if handle is None:
            # A handle inherited from the parent process shares its file position: drop it and open ours.
            self._handles = {}
            try:
                handle = zipfile.ZipFile(self.path)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{self.path}: no such file (expected an NMR_Dataset.zip archive)"
                ) from None
            except (zipfile.BadZipFile, OSError, EOFError) as error:
                raise NMRFormatError(
                    f"{self.path}: not a readable zip archive, truncated or corrupt? ({error})"
                ) from None
            self._handles[pid] = handle
        return handle

    def _where(self, member: str) -> str:
        return f"{self.path}:{self.prefix}{member}"

    def fingerprint(self) -> dict:
        return {self.path.name: _file_stamp(self.path)}

    def _has(self, member: str) -> bool:
        try:
            self._zip().getinfo(self.prefix + member)
        except KeyError:
            return False
        return True

    def _read_bytes(self, member: str) -> bytes:
        try:
            return self._zip().read(self.prefix + member)
        except KeyError:
            raise FileNotFoundError(
                f"{self._where(member)}: no such member in the archive ({_expected(member)})"
            ) from None
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
            raise NMRFormatError(
                f"{self._where(member)}: cannot read this member, archive truncated or corrupt? ({error})"
            ) from None

    def _category_folders(self) -> list[str]:
        folders = set()
        for name in self._zip().namelist():
            if name.startswith(self.prefix):
                parts = name[len(self.prefix) :].split("/")
                if len(parts) == 2 and parts[1] in {f"softras_{s}.lst" for s in SPLITS}:
                    folders.add(parts[0])
        return sorted(folders)


def _find_prefix(names: list[str], where: str) -> str:
    """The folder of the archive that holds the dataset: '' or e.g. 'NMR_Dataset/'."""
    prefixes = set()
    for name in names:
        parts = name.split("/")
        if parts[-1] == METADATA_FILE:
            prefixes.add("/".join(parts[:-1] + [""]).lstrip("/"))
        elif len(parts) >= 2 and parts[-1] in {f"softras_{s}.lst" for s in SPLITS}:
            prefixes.add("/".join(parts[:-2] + [""]).lstrip("/"))
    if not prefixes:
        raise NMRFormatError(
            f"{where}: not an NMR dataset archive, or a truncated one (found no {METADATA_FILE} and no <category>/softras_<split>.lst "
            f"among its {len(names)} members)"
        )
    return min(prefixes, key=lambda prefix: (prefix.count("/"), prefix))


def _expected(member: str) -> str:
    name = member.rsplit("/", 1)[-1]
    if name.endswith(".lst"):
        return "expected the split's list of object ids"
    if name == "cameras.npz":
        return "expected the object's cameras: world_mat_i, camera_mat_i and their inverses"
    if name.endswith(".png"):
        return "expected one of the object's 24 views, 0000.png to 0023.png"
    return "expected a file of the NMR layout"


def find_dataset_root(path: Path) -> Path | None:
    """The folder holding an NMR dataset: ``path`` itself or a single ``NMR_Dataset``-like child of it."""

    def is_root(folder: Path) -> bool:
        return (folder / METADATA_FILE).is_file() or any(
            (child / f"softras_{s}.lst").is_file()
            for child in folder.iterdir()
            if child.is_dir()
            for s in SPLITS
        )

    if is_root(path):
        return path
    children = [child for child in path.iterdir() if child.is_dir() and not child.name.startswith(".")]
    if len(children) == 1 and is_root(children[0]):
        return children[0]
    return None
