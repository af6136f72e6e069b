"""The NMR loaders over the three storages (folder, zip, Arrow), on a small synthetic dataset."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from soda_diffusers.cameras import NMR_NUM_VIEWS, nmr_rays
from soda_diffusers.cli import main
from soda_diffusers.data import (
    NMRDataset,
    NMRFormatError,
    NMRObjects,
    StepBatches,
    ViewStore,
    area_downsample_uint8,
    convert_to_arrow,
    make_synthetic_nmr,
    push_dataset_to_hub,
)

CATEGORIES = ["airplane", "04256520", "chair"]  # 04256520 (sofa) is an octal-looking id in YAML 1.1
OBJECTS_PER_CATEGORY = 4  # 2 train, 1 val, 1 test


@pytest.fixture(scope="session")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("nmr")
    folder = make_synthetic_nmr(root / "folder", OBJECTS_PER_CATEGORY, seed=1, categories=CATEGORIES)
    archive = make_synthetic_nmr(
        root / "NMR_Dataset", OBJECTS_PER_CATEGORY, seed=1, categories=CATEGORIES, zip=True
    )
    arrow = convert_to_arrow(folder, root / "arrow")
    return {"folder": folder, "zip": archive, "arrow": arrow}


def assert_same_items(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if torch.is_tensor(a[key]):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        elif isinstance(a[key], dict):
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                np.testing.assert_array_equal(a[key][name], b[key][name], err_msg=name)
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_storages_give_identical_items(stores, image_size):
    datasets = {
        name: NMRDataset(path, image_size=image_size, num_source_views=2) for name, path in stores.items()
    }
    assert len({len(d) for d in datasets.values()}) == 1
    for idx in (0, 25, len(datasets["folder"]) - 1):
        items = {name: d[idx] for name, d in datasets.items()}
        assert_same_items(items["folder"], items["zip"])
        assert_same_items(items["folder"], items["arrow"])
    objects = {
        name: NMRObjects(path, split="test", image_size=image_size, with_masks=True)
        for name, path in stores.items()
    }
    assert_same_items(objects["folder"][1], objects["zip"][1])
    assert_same_items(objects["folder"][1], objects["arrow"][1])


def test_item_layout(stores):
    dataset = NMRDataset(stores["folder"], image_size=32)
    assert dataset.categories == ["02691156", "03001627", "04256520"]
    assert dataset.category_names == ["airplane", "chair", "sofa"]
    assert len(dataset) == dataset.num_objects * NMR_NUM_VIEWS == 3 * 2 * 24
    item = dataset[30]
    assert item["source_image"].shape == item["target_image"].shape == (3, 32, 32)
    assert item["source_rays"].shape == item["target_rays"].shape == (6, 32, 32)
    for key in ("source_image", "target_image"):
        assert item[key].dtype == torch.float32 and item[key].min() >= -1 and item[key].max() <= 1
        assert item[key].max() == 1  # white background
    assert item["source_view"] == 30 % 24 and item["object_id"] == dataset.object_ids[1]
    # Rays are relative to the source camera: at the origin, looking along +z.
    assert torch.allclose(item["source_rays"][:3], torch.zeros(3, 32, 32), atol=1e-6)
    assert torch.allclose(item["source_rays"][3:, 16, 16], torch.tensor([0.0, 0.0, 1.0]), atol=0.05)


def test_items_follow_their_definition(stores):
    dataset = NMRDataset(stores["zip"], image_size=32, seed=7)
    objects = NMRObjects(stores["zip"], split="train", image_size=32)
    for idx in (3, 50, 143):
        item = dataset[idx]
        whole = objects[idx // 24]
        assert item["object_id"] == whole["object_id"]
        assert torch.equal(item["source_image"], whole["images"][item["source_view"]])
        assert torch.equal(item["target_image"], whole["images"][item["target_view"]])
        expected = nmr_rays(whole["cameras"], item["source_view"], [item["target_view"]], 32)[0]
        assert torch.equal(item["target_rays"], expected)


def test_view_draws_are_deterministic_and_exclude_sources(stores):
    a = NMRDataset(stores["folder"], image_size=16, num_source_views=3, seed=3)
    b = NMRDataset(stores["arrow"], image_size=16, num_source_views=3, seed=3)
    draws = [a.views(idx) for idx in range(len(a))]
    assert draws == [b.views(idx) for idx in range(len(b))]
    for idx, (sources, target) in enumerate(draws):
        assert sources[0] == idx % 24 and len(set(sources)) == 3 and target not in sources
    targets = [target for _, target in draws]
    assert len(set(targets)) > 12  # the targets do vary
    a.set_epoch(1)
    assert [a.views(idx) for idx in range(len(a))] != draws
    a.set_epoch(0)
    assert [a.views(idx) for idx in range(len(a))] == draws
    other_seed = NMRDataset(stores["folder"], image_size=16, num_source_views=3, seed=4)
    assert [other_seed.views(idx) for idx in range(len(a))] != draws
    item = a[5]
    assert item["source_image"].shape == (3, 3, 16, 16) and item["source_rays"].shape == (3, 6, 16, 16)
    assert torch.equal(item["source_image"], a[5]["source_image"])


def test_targets_may_include_the_source_when_asked(stores):
    dataset = NMRDataset(stores["folder"], image_size=16, exclude_source_from_targets=False)
    assert any(sources[0] == target for sources, target in map(dataset.views, range(len(dataset))))


def test_labels_match_categories(stores):
    for split in ("train", "val", "test"):
        objects = NMRObjects(stores["arrow"], split=split, image_size=16)
        for index in range(len(objects)):
            item = objects[index]
            assert objects.categories[item["label"]] == item["category"] == item["object_id"].split("/")[0]
    subset = NMRDataset(stores["zip"], categories=["sofa", "02691156"], image_size=16)
    assert subset.categories == ["02691156", "04256520"]
    labels = {subset[idx]["label"] for idx in range(0, len(subset), 24)}
    assert labels == {0, 1}


def test_view_list_fixes_the_source(stores, tmp_path):
    objects = NMRObjects(stores["folder"], split="test", image_size=16)
    lines = [f"{name.replace('/', ' ')} {5 + i}" for i, name in enumerate(objects.object_ids)]
    view_list = tmp_path / "src_dvr.txt"
    view_list.write_text("\n".join(lines + ["02958343 someothercar 3"]) + "\n")
    dataset = NMRDataset(stores["arrow"], split="test", image_size=16, view_list=view_list)
    for idx in range(len(dataset)):
        sources, target = dataset.views(idx)
        assert sources == [5 + idx // 24] and target != sources[0]
    assert [
        NMRObjects(stores["zip"], "test", 16, view_list=view_list)[i]["source_view"] for i in range(3)
    ] == [5, 6, 7]
    view_list.write_text("\n".join(lines[:2]) + "\n")
    with pytest.raises(NMRFormatError, match="no source view for 1 of the 3 objects"):
        NMRDataset(stores["folder"], split="test", view_list=view_list)


def test_training_batches_match_the_dataset_items(stores, tmp_path):
    # The store (what training reads) holds what every storage decodes, and its batches are the
    # dataset's items: the same images, the same rays from the one ray function.
    arrow = ViewStore.open(stores["arrow"], "train", 32, cache_dir=tmp_path, progress=False)
    folder = ViewStore.open(stores["folder"], "train", 32, cache_dir=tmp_path, progress=False)
    assert arrow.images.shape == (6, 24, 3, 32, 32) and arrow.labels.tolist() == NMRObjects(stores["arrow"], "train").labels
    for name in ("images", "world_mats", "unprojections"):
        np.testing.assert_array_equal(getattr(arrow, name), getattr(folder, name))
    dataset = NMRDataset(stores["arrow"], image_size=32)
    items = [dataset[i] for i in (7, 60, 100)]
    objects = torch.tensor([i // 24 for i in (7, 60, 100)])
    views = torch.tensor([[item["source_view"], item["target_view"]] for item in items])
    batch = StepBatches(arrow, 3, seed=0).pairs(objects, views)
    for key in ("source_image", "target_image", "target_rays"):
        torch.testing.assert_close(batch[key], torch.stack([item[key] for item in items]), atol=1e-6, rtol=0)


def test_area_downsampling_is_the_block_mean():
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    for size in (32, 16, 4):
        expected = torch.nn.functional.interpolate(
            torch.from_numpy(images).permute(0, 3, 1, 2).double(), size=size, mode="area"
        )
        result = area_downsample_uint8(images, size)
        assert result.dtype == np.uint8
        np.testing.assert_array_equal(
            result, np.floor(expected.permute(0, 2, 3, 1).numpy() + 0.5).astype(np.uint8)
        )
    masks = images[..., 0]
    np.testing.assert_array_equal(
        area_downsample_uint8(masks, 16, channels_last=False), area_downsample_uint8(images, 16)[..., 0]
    )


def test_dataloader_workers_read_the_zip(stores):
    dataset = NMRDataset(stores["zip"], image_size=16)
    dataset.set_epoch(2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, shuffle=False)
    batches = [batch for _, batch in zip(range(4), loader)]
    for n, batch in enumerate(batches):
        for k in range(8):
            expected = dataset[n * 8 + k]
            assert torch.equal(batch["target_image"][k], expected["target_image"])
            assert batch["target_view"][k].item() == expected["target_view"]


def test_datasets_pickle_for_spawned_workers(stores):
    for path in stores.values():
        dataset = NMRDataset(path, image_size=16)
        expected = dataset[9]  # opens handles and memory maps, which must not travel
        assert_same_items(pickle.loads(pickle.dumps(dataset))[9], expected)


def test_arrow_conversion_layout_and_size(stores, tmp_path):
    import datasets

    converted = datasets.load_from_disk(str(stores["arrow"]))
    assert sorted(converted) == ["test", "train", "val"] and converted["train"].num_rows == 6
    features = converted["train"].features
    assert features["images"].shape == (24, 64, 64, 3) and features["images"].dtype == "uint8"
    row = converted["train"].with_format("numpy")[0]
    assert row["masks"].shape == (24, 64, 64) and row["world_mat"].shape == (24, 4, 4)
    assert row["split"] == "train" and converted["train"].features["label"].names == [
        "02691156",
        "03001627",
        "04256520",
    ]
    # A conversion at 32 px stores what the folder loader makes at 32 px; 16 px is made from those
    # 32 px, so it may differ from 64 -> 16 px by one rounding step.
    small = convert_to_arrow(stores["zip"], tmp_path / "small", image_size=32, with_masks=False)
    assert_same_items(NMRDataset(small, image_size=32)[40], NMRDataset(stores["folder"], image_size=32)[40])
    from_small, from_folder = (
        NMRDataset(small, image_size=16)[40],
        NMRDataset(stores["folder"], image_size=16)[40],
    )
    assert (from_small["target_image"] - from_folder["target_image"]).abs().max() <= 1 / 127.5 + 1e-6
    assert torch.equal(from_small["target_rays"], from_folder["target_rays"])
    with pytest.raises(ValueError, match="stores 32 px images"):
        NMRDataset(small, image_size=64)
    with pytest.raises(NMRFormatError, match="no column 'masks'"):
        NMRObjects(small, with_masks=True)[0]


def test_convert_cli(stores, tmp_path, capsys):
    out = tmp_path / "cli-arrow"
    assert main(["convert", "--src", str(stores["zip"]), "--out", str(out), "--categories", "chair"]) == 0
    assert "wrote" in capsys.readouterr().out
    dataset = NMRDataset(out, image_size=16)
    assert dataset.categories == ["03001627"]
    assert_same_items(dataset[3], NMRDataset(stores["folder"], image_size=16, categories=["chair"])[3])
    assert main(["convert", "--src", str(stores["zip"]), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_push_to_hub_needs_a_token(stores, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ValueError, match="no Hugging Face token"):
        push_dataset_to_hub(stores["arrow"], "someone/nmr-synthetic")
