"""Training batches streamed with ``datasets`` from Parquet shards, for data larger than a disk: a Hub
dataset pushed by :func:`~soda_diffusers.data.push_dataset_to_hub`, a local folder in its layout
(``<dir>/data/<split>-*.parquet``), or anything else ``datasets.load_dataset(..., streaming=True)`` reads
with the columns of :mod:`soda_diffusers.data.arrow`.

The memory-mapped path (:class:`~soda_diffusers.data.pairs.StepBatches`) draws any object at any step;
a stream can only be read in order, so here each step takes the next ``batch_size`` objects of this
rank's part of the stream (an epoch ends where the stream does) and its position is saved with the
checkpoint (:meth:`StreamingBatches.state_dict`). Views are drawn and pairs assembled by the very code of
the memory-mapped path (:func:`~soda_diffusers.data.pairs.draw_views`,
:func:`~soda_diffusers.data.pairs.pair_batch`): the same rows and step give the same batch.
"""

from __future__ import annotations

import numpy as np
import torch

from soda_diffusers.cameras import NMR_NUM_VIEWS
from soda_diffusers.data.errors import NMRFormatError, short_error
from soda_diffusers.data.images import area_downsample_uint8, check_image_size
from soda_diffusers.data.layout import NMR_CATEGORIES, resolve_categories
from soda_diffusers.data.pairs import draw_views, pair_batch, stream_generator

# Only these become numpy arrays (masks are read with their row group but never converted).
COLUMNS = ("object_id", "category", "images", "world_mat", "world_mat_inv", "camera_mat_inv")
MATRICES = ("world_mat", "world_mat_inv", "camera_mat_inv")


class StreamingBatches:
    """The training batches of ``split`` of ``data`` on process ``rank`` of ``world_size``, read in order
    from a ``datasets`` stream: :meth:`batch` ``(step)`` holds the next ``batch_size`` objects, with the
    views of the ``views`` stream of ``(seed, step, rank)``. ``categories``: synset ids or names (None:
    all). ``shuffle_buffer`` > 0 shuffles the stream through a buffer of that many objects (and the
    shard order), anew each epoch.

    Ranks read disjoint parts: whole Parquet shards when their number is a multiple of ``world_size``,
    otherwise every ``world_size``-th object of the whole stream (each rank then downloads everything).
    """

    def __init__(
        self,
        data: str,
        split: str,
        image_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_source_views: int = 1,
        categories=None,
        shuffle_buffer: int = 0,
    ):
        import datasets
        import pyarrow as pa
        import pyarrow.compute as pc
        from datasets.distributed import split_dataset_by_node

        self.data, self.split = str(data), split
        self.image_size, self.batch_size = int(image_size), int(batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.num_source_views = int(num_source_views)
        draw_views(torch.Generator(), 1, self.num_source_views)  # checks num_source_views now
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected a positive number of objects, got {batch_size}")
        self.where = f"{self.data} (split {split!r})"
        try:
            stream = datasets.load_dataset(self.data, split=split, streaming=True)
        except Exception as error:
            raise FileNotFoundError(
                f"{self.data}: cannot stream split {split!r} with datasets.load_dataset "
                f"({short_error(error)})"
            ) from error
        features = stream.features
        self.stored_size = None
        if features is not None:
            missing = [name for name in COLUMNS if name not in features]
            if missing:
                raise NMRFormatError(
                    f"{self.where}: lacks the columns {missing} (expected {list(COLUMNS)}, "
                    "as written by push_dataset_to_hub)"
                )
            shape = tuple(getattr(features["images"], "shape", ()))
            if len(shape) == 4:
                check_image_size(self.image_size, shape[1], self.where)
                self.stored_size = shape[1]
        # Arrow rows all the way: a filter or format in Python would turn every image into lists of ints,
        # and the "numpy" format casts uint8 images to int64 and float64 cameras to float32.
        stream = stream.select_columns(list(COLUMNS)).with_format("arrow")
        if categories is not None:
            label = features.get("label") if features is not None else None
            synsets = getattr(label, "names", None) or list(NMR_CATEGORIES)
            available = {synset: NMR_CATEGORIES.get(synset, synset) for synset in synsets}
            wanted = pa.array(resolve_categories(categories, available, self.where))
            stream = stream.filter(lambda table: pc.is_in(table["category"], wanted), batched=True)
        stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
        if shuffle_buffer > 0:
            stream = stream.shuffle(seed=self.seed, buffer_size=int(shuffle_buffer))
        self.stream = stream
        self.epoch = 0
        self._rows = None
        self.last_object_ids: list[str] = []

    def _next_row(self):
        """The next object of this rank's stream, a one-row Arrow table; the next epoch follows its end."""
        empty_epochs = 0
        while True:
            if self._rows is None:
                # The stream applies a loaded state only in the epoch it was saved in.
                self.stream.set_epoch(self.epoch)
                self._rows = iter(self.stream)
            row = next(self._rows, None)
            if row is not None:
                return row
            # A resumed stream may start at the very end of its epoch: two empty epochs in a row are empty.
            empty_epochs += 1
            if empty_epochs == 2:
                raise NMRFormatError(
                    f"{self.where}: no objects to read on rank {self.rank} of {self.world_size}"
                )
            self.epoch += 1
            self._rows = None

    def _arrays(self, row) -> dict[str, np.ndarray]:
        """The image and camera arrays of a one-row table, checked against the NMR shapes."""
        object_id = row.column("object_id")[0].as_py()
        arrays = {}
        for name in ("images", *MATRICES):
            # Array<N>D columns give numpy with their stored dtype (uint8 images, float64 cameras).
            arrays[name] = row.column(name).combine_chunks().to_numpy(zero_copy_only=False)[0]
        images = arrays["images"]
        if self.stored_size is None and images.ndim == 4:
            self.stored_size = images.shape[1]
            check_image_size(self.image_size, self.stored_size, self.where)
        size = self.stored_size
        expected = {"images": ((NMR_NUM_VIEWS, size, size, 3), np.uint8)}
        expected.update({name: ((NMR_NUM_VIEWS, 4, 4), np.float64) for name in MATRICES})
        for name, (shape, dtype) in expected.items():
            array = arrays[name]
            if array.shape != shape or array.dtype != dtype:
                raise NMRFormatError(
                    f"{self.where}: object {object_id}: column {name!r} should be a {shape} "
                    f"{np.dtype(dtype)} array, got {array.shape} {array.dtype}"
                )
        arrays["object_id"] = object_id
        return arrays

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of ``step``: the next ``batch_size`` objects of the stream (their ids in
        :attr:`last_object_ids`), views drawn from the ``views`` stream of ``(seed, step, rank)``."""
        rows = [self._arrays(self._next_row()) for _ in range(self.batch_size)]
        views = draw_views(
            stream_generator(self.seed, step, self.rank, "views"), self.batch_size, self.num_source_views
        )
        images, world_mats, unprojections = [], [], []
        for arrays, row_views in zip(rows, views.numpy()):
            views_images = area_downsample_uint8(arrays["images"][row_views], self.image_size)
            images.append(views_images.transpose(0, 3, 1, 2))
            world_mats.append(arrays["world_mat"][row_views])
            unprojections.append(arrays["world_mat_inv"][row_views] @ arrays["camera_mat_inv"][row_views])
        self.last_object_ids = [arrays["object_id"] for arrays in rows]
        return pair_batch(np.stack(images), np.stack(world_mats), np.stack(unprojections))

    def close(self) -> None:
        """Close the stream's files now: a reader left open at interpreter exit makes ``datasets`` print
        ignored exceptions. (Closing, or ending an epoch of, a shuffled Parquet stream waits 5 s for
        ``datasets``' reader threads: ``datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN``.)"""
        if self._rows is not None:
            self._rows.close()
            self._rows = None

    def state_dict(self) -> dict:
        """The position after the last object read, JSON-serialisable: save it with the checkpoint of the
        step whose batch was read last. With a shuffle buffer, the objects waiting in the buffer are not
        saved: for the rest of that epoch a resumed run misses them (and may repeat a few), then the next
        epochs are exactly those of an uninterrupted run."""
        return {"epoch": self.epoch, "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`, taken from a reader over the same data, split, rank,
        world size, categories and shuffle buffer."""
        self.close()
        self.epoch = int(state["epoch"])
        self.stream.load_state_dict(state["stream"])
