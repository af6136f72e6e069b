"""The memory-mapped view store: the same values as the loaders, built once, rebuilt when its data
changes, and never left half-written."""

import os

import numpy as np
import pytest
import torch

from soda_diffusers.cameras import view_matrices
from soda_diffusers.data import NMRFormatError, NMRObjects, ViewStore, convert_to_arrow, make_synthetic_nmr
from soda_diffusers.data.store import MANIFEST_FILE


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "nmr"
    make_synthetic_nmr(path, objects_per_category=3, seed=0, categories=["airplane", "car"])
    return path


def store_dirs(cache):
    return sorted(p for p in cache.iterdir() if (p / MANIFEST_FILE).is_file())


@pytest.mark.parametrize("size", [16, 64])
def test_store_holds_what_the_loaders_decode(data, tmp_path, size):
    store = ViewStore.open(data, "test", size, cache_dir=tmp_path, progress=False)
    objects = NMRObjects(data, split="test", image_size=size)
    assert store.object_ids == objects.object_ids and store.labels.tolist() == objects.labels
    assert store.images.dtype == np.uint8 and store.images.shape == (len(objects), 24, 3, size, size)
    assert isinstance(store.images, np.memmap)
    for index in range(len(objects)):
        obj = objects[index]
        torch.testing.assert_close(torch.from_numpy(np.array(store.images[index])).float() / 127.5 - 1, obj["images"],
                                   atol=1e-6, rtol=0)
        world_mat, unprojection = view_matrices(obj["cameras"], 5)
        np.testing.assert_array_equal(store.world_mats[index, 5], world_mat)
        np.testing.assert_array_equal(store.unprojections[index, 5], unprojection)
    # Evaluation reads through the store: the same items.
    stored = NMRObjects(data, split="test", image_size=size, store=True, cache_dir=tmp_path)
    torch.testing.assert_close(stored[1]["images"], objects[1]["images"], atol=0, rtol=0)
    mean = torch.stack([objects[i]["images"] for i in range(len(objects))]).mean(dim=(0, 1))
    torch.testing.assert_close(store.mean_image(chunk=1), mean, atol=1e-5, rtol=0)


def test_store_is_built_once_and_the_same_from_every_storage(data, tmp_path):
    first = ViewStore.open(data, "train", 32, cache_dir=tmp_path / "cache", progress=False)
    stamp = os.stat(first.directory / "images.npy").st_mtime_ns
    again = ViewStore.open(data, "train", 32, cache_dir=tmp_path / "cache", progress=False)
    assert again.directory == first.directory and os.stat(again.directory / "images.npy").st_mtime_ns == stamp
    convert_to_arrow(data, tmp_path / "arrow", image_size=64)
    from_arrow = ViewStore.open(tmp_path / "arrow", "train", 32, cache_dir=tmp_path / "cache", progress=False)
    assert from_arrow.directory != first.directory
    np.testing.assert_array_equal(from_arrow.images, first.images)
    np.testing.assert_array_equal(from_arrow.unprojections, first.unprojections)


def test_store_of_other_data_or_another_size_is_rebuilt(data, tmp_path, capsys):
    source = tmp_path / "nmr"
    make_synthetic_nmr(source, objects_per_category=2, seed=0, categories=["car"])
    cache = tmp_path / "cache"
    store = ViewStore.open(source, "train", 32, cache_dir=cache, progress=False)
    old_images = np.array(store.images)
    # The same path, other data: the store notices and rebuilds.
    make_synthetic_nmr(source, objects_per_category=2, seed=1, categories=["car"], overwrite=True)
    rebuilt = ViewStore.open(source, "train", 32, cache_dir=cache, progress=False)
    assert "rebuilding" in capsys.readouterr().out
    assert rebuilt.directory == store.directory and not np.array_equal(np.array(rebuilt.images), old_images)
    # A store directory that claims another resolution is not reused either.
    manifest = (rebuilt.directory / MANIFEST_FILE).read_text()
    (rebuilt.directory / MANIFEST_FILE).write_text(manifest.replace('"image_size": 32', '"image_size": 16'))
    again = ViewStore.open(source, "train", 32, cache_dir=cache, progress=False)
    assert "image_size" in capsys.readouterr().out
    assert again.image_size == 32 and again.images.shape[-1] == 32
    # Each resolution has its own store.
    ViewStore.open(source, "train", 16, cache_dir=cache, progress=False)
    assert len(store_dirs(cache)) == 2


def test_a_corrupt_image_is_named_and_no_half_written_store_is_left(tmp_path):
    source = tmp_path / "nmr"
    make_synthetic_nmr(source, objects_per_category=2, seed=0, categories=["car"])
    object_id = (source / "02958343" / "softras_train.lst").read_text().split()[0]
    image = source / "02958343" / object_id / "image" / "0007.png"
    image.write_bytes(image.read_bytes()[:40])  # truncated
    cache = tmp_path / "cache"
    with pytest.raises(NMRFormatError) as error:
        ViewStore.open(source, "train", 32, cache_dir=cache, progress=False)
    message = str(error.value)
    assert str(image) in message and f"02958343/{object_id}" in message and "view 7" in message
    assert list(cache.iterdir()) == []  # nothing half-written is left to be opened
