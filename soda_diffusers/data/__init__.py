"""Data for SODA on NMR: loaders for the NMR dataset (a folder, ``NMR_Dataset.zip`` read in place, or
an Arrow directory), the built-in synthetic NMR dataset, and conversion to Arrow with ``datasets``.

The modules import one way, each only from those listed before it:

1. helpers: :mod:`~soda_diffusers.data.errors`, :mod:`~soda_diffusers.data.layout` (the NMR layout),
   :mod:`~soda_diffusers.data.images` (resizing), :mod:`~soda_diffusers.data.atomic` (writing in
   place), :mod:`~soda_diffusers.data.cache` (the cache folder);
2. storage backends: :mod:`~soda_diffusers.data.storage` (the interface; folder and zip reading),
   :mod:`~soda_diffusers.data.arrow` (the Arrow format and its reading);
3. :mod:`~soda_diffusers.data.sources` (:func:`open_storage`: the backend for a path or a Hub id),
   then :mod:`~soda_diffusers.data.convert` (writing Arrow, pushing it to the Hub);
4. :mod:`~soda_diffusers.data.index` (the objects of a split);
5. :mod:`~soda_diffusers.data.store` (the memory-mapped store that training and evaluation read);
6. readers: :mod:`~soda_diffusers.data.nmr` (the PyTorch datasets), :mod:`~soda_diffusers.data.pairs`
   (training batches and their random streams), :mod:`~soda_diffusers.data.streaming` (training
   batches streamed from Parquet).

Beside them, :mod:`~soda_diffusers.data.synthetic` writes the synthetic dataset, drawn by
:mod:`~soda_diffusers.data.shapes` and :mod:`~soda_diffusers.data.raytrace`. ``datasets`` and
``pyarrow`` are imported inside the functions that use them: reading folders and zips needs neither,
so importing this package does not load them.
"""

from soda_diffusers.data.cache import default_cache_dir
from soda_diffusers.data.convert import convert_to_arrow, push_dataset_to_hub
from soda_diffusers.data.errors import NMRFormatError
from soda_diffusers.data.images import area_downsample_uint8
from soda_diffusers.data.layout import NMR_CATEGORIES, NMR_IMAGE_SIZE, SPLITS, read_view_list
from soda_diffusers.data.nmr import NMRDataset, NMRObjects
from soda_diffusers.data.pairs import StepBatches
from soda_diffusers.data.sources import open_storage
from soda_diffusers.data.store import ViewStore
from soda_diffusers.data.streaming import StreamingBatches
from soda_diffusers.data.synthetic import default_synthetic_dataset, make_synthetic_nmr, synthetic_objects

__all__ = [
    "NMR_CATEGORIES",
    "NMR_IMAGE_SIZE",
    "SPLITS",
    "NMRDataset",
    "NMRFormatError",
    "NMRObjects",
    "StepBatches",
    "StreamingBatches",
    "ViewStore",
    "area_downsample_uint8",
    "convert_to_arrow",
    "default_cache_dir",
    "default_synthetic_dataset",
    "make_synthetic_nmr",
    "open_storage",
    "push_dataset_to_hub",
    "read_view_list",
    "synthetic_objects",
]
