"""Which objects are read, in which order: the index of one split of a storage (its categories,
objects, labels and evaluation source views) that the view store and the PyTorch datasets share.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from soda_diffusers.data.errors import NMRFormatError
from soda_diffusers.data.images import area_downsample_uint8, check_image_size
from soda_diffusers.data.layout import category_aliases, check_split, read_view_list, resolve_categories
from soda_diffusers.data.sources import open_storage
from soda_diffusers.data.storage import NMRStorage


class NMRObjectIndex:
    """The objects of some categories' split of a storage, in a fixed order: categories sorted by
    synset id, objects in the order of their split file. ``path``: anything
    :func:`~soda_diffusers.data.open_storage` takes; ``image_size``: a size dividing the stored one."""

    def __init__(self, path, split: str, categories, image_size: int):
        self.storage: NMRStorage = open_storage(path)
        self.split = check_split(split)
        available = self.storage.categories()
        self.categories = resolve_categories(categories, available, self.storage.description)
        self.category_names = [
            (category_aliases(available[synset]) or [synset])[0] for synset in self.categories
        ]
        self.image_size = check_image_size(image_size, self.storage.image_size, self.storage.description)
        self._objects = []
        self._labels = []
        for label, synset in enumerate(self.categories):
            for object_id in self.storage.object_ids(synset, self.split):
                self._objects.append((synset, object_id))
                self._labels.append(label)
        if not self._objects:
            names = ", ".join(f"{s} ({n})" for s, n in zip(self.categories, self.category_names))
            raise NMRFormatError(
                f"{self.storage.description}: split {self.split!r} has no objects in categories {names}"
            )

    @property
    def object_ids(self) -> list[str]:
        """``"<synset>/<object>"`` of every object, in dataset order."""
        return [f"{synset}/{object_id}" for synset, object_id in self._objects]

    @property
    def labels(self) -> list[int]:
        return list(self._labels)

    @property
    def num_objects(self) -> int:
        return len(self._objects)

    def _source_views_from_list(self, view_list) -> list[int] | None:
        """Each object's view from ``view_list``: a view list file, or ``"stored"`` for the one stored with
        the data (:meth:`NMRStorage.source_views`, None when the data has none)."""
        if view_list is None:
            return None
        if view_list == "stored":
            views, where = self.storage.source_views(), f"{self.storage.description}'s source views"
            if views is None:
                return None
        else:
            views, where = read_view_list(view_list), f"view list {os.fspath(view_list)!r}"
        missing = [name for name in self.object_ids if name not in views]
        if missing:
            raise NMRFormatError(
                f"{where}: no source view for {len(missing)} of the {self.num_objects} "
                f"objects of split {self.split!r}, e.g. {missing[0]!r}"
            )
        return [views[name] for name in self.object_ids]

    def _images(self, index: int, views: Sequence[int]) -> np.ndarray:
        """``views`` of object ``index`` at ``image_size``, ``(len(views), S, S, 3)`` uint8."""
        synset, object_id = self._objects[index]
        images = self.storage.read_images(synset, object_id, views)
        return area_downsample_uint8(images, self.image_size)
