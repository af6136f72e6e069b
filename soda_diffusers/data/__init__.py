"""Data for SODA on NMR: loaders for the NMR dataset (a folder, ``NMR_Dataset.zip`` read in place, or
an Arrow directory), the built-in synthetic NMR dataset, and conversion to Arrow with ``datasets``.

Modules: :mod:`~soda_diffusers.data.layout` (the NMR layout), :mod:`~soda_diffusers.data.storage`
(folder and zip reading), :mod:`~soda_diffusers.data.arrow` (Arrow conversion and reading),
:mod:`~soda_diffusers.data.nmr` (the PyTorch datasets), :mod:`~soda_diffusers.data.store` (the
memory-mapped store that training and evaluation read), :mod:`~soda_diffusers.data.pairs` (training
batches and their random streams), :mod:`~soda_diffusers.data.synthetic`
(the synthetic dataset, drawn by :mod:`~soda_diffusers.data.shapes` and
:mod:`~soda_diffusers.data.raytrace`).
"""

from soda_diffusers.data.arrow import convert_to_arrow, push_dataset_to_hub
from soda_diffusers.data.errors import NMRFormatError
from soda_diffusers.data.layout import NMR_CATEGORIES, NMR_IMAGE_SIZE, SPLITS, read_view_list
from soda_diffusers.data.nmr import NMRDataset, NMRObjects, area_downsample_uint8
from soda_diffusers.data.pairs import StepBatches
from soda_diffusers.data.storage import open_storage
from soda_diffusers.data.store import ViewStore
from soda_diffusers.data.streaming import StreamingBatches
from soda_diffusers.data.synthetic import (
    default_cache_dir,
    default_synthetic_dataset,
    make_synthetic_nmr,
    synthetic_objects,
)

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
