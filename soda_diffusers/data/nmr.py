"""PyTorch datasets over NMR-format data (a folder, ``NMR_Dataset.zip`` or an Arrow directory).

* :class:`NMRDataset`: (source view(s), target view) pairs for training, drawn deterministically.
* :class:`NMRObjects`: whole objects (24 views and cameras) for evaluation, their images read from the
  memory-mapped :class:`~soda_diffusers.data.ViewStore` with ``store=True`` (as training reads them).

Images are resized from the stored 64 px by :func:`~soda_diffusers.data.images.area_downsample_uint8`,
so that every storage, and the store, give the very same values; they come out as float tensors in
[-1, 1]. Rays are those of :func:`soda_diffusers.cameras.nmr_rays`, in the frame of the (first)
source camera.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from soda_diffusers.cameras import NMR_NUM_VIEWS, nmr_rays
from soda_diffusers.data.images import area_downsample_uint8
from soda_diffusers.data.index import NMRObjectIndex
from soda_diffusers.data.store import ViewStore


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(..., H, W, 3)`` -> float32 ``(..., 3, H, W)`` in [-1, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3)
    return tensor.float() / 127.5 - 1.0


class _RayCache:
    """Rays of single views, keyed by the camera matrices they are computed from.

    The NMR rig has 24 cameras, so a dataset needs at most 24 x 24 (source, view) rays per size
    whatever its number of objects; computing them costs more than reading an item from Arrow.
    Entries are :func:`~soda_diffusers.cameras.nmr_rays` results, so cached or not, items are identical.
    """

    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._rays = {}

    def __call__(self, cameras: dict, source_view: int, views: Sequence[int], size: int) -> torch.Tensor:
        source = cameras[f"world_mat_{source_view}"].tobytes()
        rays = []
        for view in views:
            key = (
                size,
                source,
                cameras[f"world_mat_inv_{view}"].tobytes(),
                cameras[f"camera_mat_inv_{view}"].tobytes(),
            )
            if key not in self._rays:
                if len(self._rays) >= self.max_entries:
                    self._rays.pop(next(iter(self._rays)))
                self._rays[key] = nmr_rays(cameras, source_view, [view], size)[0]
            rays.append(self._rays[key])
        return torch.stack(rays)


class NMRDataset(NMRObjectIndex, torch.utils.data.Dataset):
    """(source view(s), target view) pairs of NMR objects, for training SODA.

    Args:
        path: an NMR folder, ``NMR_Dataset.zip`` (read in place), or an Arrow directory written by
            :func:`~soda_diffusers.data.convert_to_arrow`.
        split: ``"train"``, ``"val"`` or ``"test"`` (the SoftRas split files).
        image_size: output resolution; a size dividing the stored 64 px (area downsampling).
        categories: synset ids or names (``["airplane", "02958343"]``); all categories by default.
        num_source_views: ``k`` source views per item.
        exclude_source_from_targets: never draw a source view as the target.
        view_list: a pixelNeRF view list (``category object view`` lines, e.g. ``src_dvr.txt``)
            fixing each object's first source view.
        seed: seed of the view draws, with the epoch (:meth:`set_epoch`) and the item index.

    ``len(dataset) = num_objects * 24``. Item ``idx`` is object ``idx // 24`` with first source view
    ``idx % 24`` (or the view list's view); the other sources and the target are drawn by
    ``np.random.default_rng([seed, epoch, idx])``, so an item depends on nothing but
    ``(seed, epoch, idx)``: training resumes exactly, in any worker.

    Items are dicts:

    * ``source_image``: ``(3, H, W)`` float in [-1, 1], ``(k, 3, H, W)`` when ``k > 1``;
    * ``source_rays``: ``(6, H, W)`` or ``(k, 6, H, W)``, the source views' rays;
    * ``target_image``: ``(3, H, W)``; ``target_rays``: ``(6, H, W)``;
    * ``source_view`` (the first source's view), ``target_view``, ``label``: ints;
    * ``object_id``: ``"<synset>/<object>"``.

    Rays ``[origin, direction]`` are expressed in the frame of the first source camera.
    ``label`` indexes :attr:`categories` (sorted synset ids; names in :attr:`category_names`).
    """

    def __init__(
        self,
        path,
        split: str = "train",
        image_size: int = 32,
        categories: Iterable[str] | str | None = None,
        num_source_views: int = 1,
        exclude_source_from_targets: bool = True,
        view_list: str | os.PathLike | None = None,
        seed: int = 0,
    ):
        super().__init__(path, split, categories, image_size)
        available = NMR_NUM_VIEWS - 1 if exclude_source_from_targets else NMR_NUM_VIEWS
        if not 1 <= int(num_source_views) <= available:
            raise ValueError(f"num_source_views: expected 1..{available}, got {num_source_views}")
        self.num_source_views = int(num_source_views)
        self.exclude_source_from_targets = bool(exclude_source_from_targets)
        self.seed = int(seed)
        self.epoch = 0
        self.fixed_source_views = self._source_views_from_list(view_list)
        self._ray_cache = _RayCache()

    def set_epoch(self, epoch: int) -> None:
        """Draw a new set of source/target pairs (call at the start of each epoch, before iterating)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_objects * NMR_NUM_VIEWS

    def views(self, idx: int) -> tuple[list[int], int]:
        """``(source_views, target_view)`` of item ``idx`` for the current epoch."""
        index, first = divmod(idx, NMR_NUM_VIEWS)
        if self.fixed_source_views is not None:
            first = self.fixed_source_views[index]
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        others = [v for v in range(NMR_NUM_VIEWS) if v != first]
        extra = (
            rng.choice(others, size=self.num_source_views - 1, replace=False).tolist()
            if self.num_source_views > 1
            else []
        )
        sources = [first] + [int(v) for v in extra]
        candidates = (
            [v for v in range(NMR_NUM_VIEWS) if v not in sources]
            if self.exclude_source_from_targets
            else list(range(NMR_NUM_VIEWS))
        )
        target = int(candidates[rng.integers(len(candidates))])
        return sources, target

    def __getitem__(self, idx: int) -> dict:
        idx = int(idx)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for a dataset of {len(self)} items")
        sources, target = self.views(idx)
        index = idx // NMR_NUM_VIEWS
        synset, object_id = self._objects[index]
        views = sources + [target]
        images = to_model_range(self._images(index, views))
        cameras = self.storage.read_cameras(synset, object_id, sorted(set(views)))
        rays = self._ray_cache(cameras, sources[0], views, self.image_size)
        k = self.num_source_views
        return {
            "source_image": images[0] if k == 1 else images[:k],
            "source_rays": rays[0] if k == 1 else rays[:k],
            "target_image": images[k],
            "target_rays": rays[k],
            "source_view": sources[0],
            "target_view": target,
            "label": self._labels[index],
            "object_id": f"{synset}/{object_id}",
        }


class NMRObjects(NMRObjectIndex):
    """Whole NMR objects, for evaluation: a sequence of dicts

    * ``images``: ``(24, 3, H, W)`` float in [-1, 1];
    * ``cameras``: the object's ``cameras.npz`` as a dict of float64 ``(4, 4)`` arrays
      (``world_mat_i``, ``world_mat_inv_i``, ``camera_mat_i``, ``camera_mat_inv_i``, i = 0..23);
    * ``label`` (int), ``category`` (synset id), ``object_id`` (``"<synset>/<object>"``);
    * ``source_view`` (int), with a ``view_list`` (e.g. pixelNeRF's ``src_dvr.txt``);
    * ``masks``: ``(24, 1, H, W)`` float in [0, 1], with ``with_masks=True``.

    Arguments are those of :class:`NMRDataset`, and ``store``: read the images from the split's
    :class:`~soda_diffusers.data.ViewStore` (built on first use, under ``cache_dir``), the same
    values as decoded from ``path``, without decoding them again for every pass.
    """

    def __init__(
        self,
        path,
        split: str = "test",
        image_size: int = 32,
        categories: Iterable[str] | str | None = None,
        view_list: str | os.PathLike | None = None,
        with_masks: bool = False,
        store: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ):
        super().__init__(path, split, categories, image_size)
        self.source_views = self._source_views_from_list(view_list)
        self.with_masks = bool(with_masks)
        self.store = ViewStore.open(self.storage, split, image_size, categories, cache_dir) if store else None

    def __len__(self) -> int:
        return self.num_objects

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} objects")
        index %= len(self)
        synset, object_id = self._objects[index]
        views = range(NMR_NUM_VIEWS)
        if self.store is not None:
            images = torch.from_numpy(np.array(self.store.images[index])).float() / 127.5 - 1.0
        else:
            images = to_model_range(self._images(index, views))
        item = {
            "images": images,
            "cameras": self.storage.read_cameras(synset, object_id),
            "label": self._labels[index],
            "category": synset,
            "object_id": f"{synset}/{object_id}",
        }
        if self.source_views is not None:
            item["source_view"] = self.source_views[index]
        if self.with_masks:
            masks = self.storage.read_masks(synset, object_id, views)
            masks = area_downsample_uint8(masks, self.image_size, channels_last=False)
            item["masks"] = torch.from_numpy(masks).float().div(255.0).unsqueeze(1)
        return item
