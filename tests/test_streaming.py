"""Streamed training batches (:class:`StreamingBatches`) and Hub dataset ids in ``open_storage``, offline:
local Parquet folders in the layout ``push_dataset_to_hub`` writes stand in for Hub datasets."""

from __future__ import annotations

import itertools
import json

import datasets
import numpy as np
import pytest
import torch

from soda_diffusers.data import NMRFormatError, convert_to_arrow, make_synthetic_nmr, open_storage
from soda_diffusers.data.arrow import ArrowStorage
from soda_diffusers.data.pairs import StepBatches, draw_views, stream_generator
from soda_diffusers.data.store import ViewStore
from soda_diffusers.data.streaming import StreamingBatches

STORED_SIZE = 32
IMAGE_SIZE = 16
SEED = 3
HUB_ID = "someone/nmr-32"


@pytest.fixture(scope="module")
def nmr(tmp_path_factory):
    """The synthetic data as an Arrow directory, its splits as Parquet in the Hub layout (one shard each),
    and all its objects as a four-shard ``train`` split."""
    datasets.disable_progress_bars()
    root = tmp_path_factory.mktemp("streaming")
    folder = make_synthetic_nmr(root / "nmr", objects_per_category=3, seed=0,
                                categories=["airplane", "car", "chair"])
    arrow_dir = convert_to_arrow(folder, root / "arrow", image_size=STORED_SIZE)
    splits = datasets.load_from_disk(str(arrow_dir))
    for split, dataset in splits.items():
        dataset.to_parquet(str(root / "parquet" / "data" / f"{split}-00000-of-00001.parquet"))
    everything = datasets.concatenate_datasets(list(splits.values()))
    for shard in range(4):
        everything.shard(4, shard, contiguous=True).to_parquet(
            str(root / "sharded" / "data" / f"train-{shard:05d}-of-00004.parquet")
        )
    return {
        "root": root,
        "arrow": arrow_dir,
        "parquet": str(root / "parquet"),
        "sharded": str(root / "sharded"),
        "train_ids": list(splits["train"]["object_id"]),
        "all_ids": list(everything["object_id"]),
    }


def reader(data, **kwargs) -> StreamingBatches:
    options = dict(split="train", image_size=IMAGE_SIZE, batch_size=2, seed=SEED)
    return StreamingBatches(data, **{**options, **kwargs})


def read(batches: StreamingBatches, steps) -> list[tuple[dict[str, torch.Tensor], list[str]]]:
    return [(batches.batch(step), list(batches.last_object_ids)) for step in steps]


def assert_same(expected, got):
    for (expected_batch, expected_ids), (batch, ids) in zip(expected, got, strict=True):
        assert ids == expected_ids
        assert batch.keys() == expected_batch.keys()
        for key in batch:
            assert torch.equal(batch[key], expected_batch[key]), key


@pytest.mark.parametrize("num_source_views", [1, 2])
def test_batch_shapes_dtypes_and_ranges(nmr, num_source_views):
    batches = reader(nmr["parquet"], batch_size=3, num_source_views=num_source_views)
    batch = batches.batch(0)
    size = IMAGE_SIZE
    source_shape = (3, size, size) if num_source_views == 1 else (num_source_views, 3, size, size)
    assert batch["source_image"].shape == (3, *source_shape)
    assert batch["target_image"].shape == (3, 3, size, size)
    assert batch["target_rays"].shape == (3, 6, size, size)
    assert ("source_rays" in batch) == (num_source_views > 1)
    if num_source_views > 1:
        assert batch["source_rays"].shape == (3, num_source_views, 6, size, size)
    for value in batch.values():
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
    for key in ("source_image", "target_image"):
        assert -1 <= batch[key].min() and batch[key].max() <= 1 and batch[key].std() > 0.05
    assert sorted(batches.last_object_ids) == sorted(nmr["train_ids"])
    batches.close()


def test_batch_is_the_memory_mapped_pairs_of_the_same_rows(nmr, tmp_path):
    """In stream order, and through the memory-mapped path's own drawing and assembly (StepBatches.pairs
    over a ViewStore of the same data): the same objects and step give the same tensors, exactly."""
    store = ViewStore.open(nmr["arrow"], "train", IMAGE_SIZE, cache_dir=tmp_path, progress=False)
    mapped = StepBatches(store, batch_size=2, seed=SEED, num_source_views=2)
    batches = reader(nmr["parquet"], num_source_views=2)
    stream_order = nmr["train_ids"] * 2
    for step in range(3):
        batch = batches.batch(step)
        assert batches.last_object_ids == stream_order[2 * step : 2 * step + 2]
        objects = torch.tensor([store.object_ids.index(name) for name in batches.last_object_ids])
        views = draw_views(stream_generator(SEED, step, 0, "views"), 2, 2)
        expected = mapped.pairs(objects, views)
        assert batch.keys() == expected.keys()
        for key in batch:
            assert torch.equal(batch[key], expected[key]), key
    batches.close()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"batch_size": 3, "num_source_views": 2, "categories": ["car", "03001627"]},
        {"rank": 1, "world_size": 2},
    ],
    ids=["plain", "categories", "two-ranks"],
)
def test_resume_from_a_json_state_continues_exactly(nmr, options):
    data = nmr["sharded"]
    uninterrupted = reader(data, **options)
    expected = read(uninterrupted, range(6))
    interrupted = reader(data, **options)
    assert_same(expected[:3], read(interrupted, range(3)))
    # Taken right after batch(2), before anything reads on: the state must already point past its rows.
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = reader(data, **options)
    resumed.load_state_dict(state)
    assert_same(expected[3:], read(resumed, range(3, 6)))
    # Not by chance: a reader starting over would read other objects at these steps.
    restarted = reader(data, **options)
    assert [ids for _, ids in read(restarted, range(3, 6))] != [ids for _, ids in expected[3:]]
    for batches in (uninterrupted, interrupted, resumed, restarted):
        batches.close()


def test_resume_at_the_end_of_an_epoch(nmr):
    batches = reader(nmr["parquet"], batch_size=3)
    first = read(batches, [0])
    assert sorted(first[0][1]) == sorted(nmr["train_ids"])
    state = json.loads(json.dumps(batches.state_dict()))
    expected = read(batches, [1])
    resumed = reader(nmr["parquet"], batch_size=3)
    resumed.load_state_dict(state)
    assert_same(expected, read(resumed, [1]))
    assert resumed.epoch == 1
    batches.close()
    resumed.close()


def test_epochs_wrap_around_mid_batch(nmr):
    batches = reader(nmr["parquet"], batch_size=2)
    ids, epochs = [], []
    for step in range(6):
        batches.batch(step)
        ids += batches.last_object_ids
        epochs.append(batches.epoch)
    assert ids == nmr["train_ids"] * 4
    assert epochs == [0, 1, 1, 2, 3, 3]
    batches.close()


@pytest.mark.parametrize("data", ["parquet", "sharded"], ids=["every-other-object", "shard-per-rank"])
def test_two_ranks_read_disjoint_objects(nmr, data):
    ids = {}
    for rank in range(2):
        batches = reader(nmr[data], batch_size=1, rank=rank, world_size=2)
        ids[rank] = epochs_read(batches, 1)[0]
        batches.close()
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(nmr["train_ids" if data == "parquet" else "all_ids"])


@pytest.fixture
def no_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s whenever a shuffled Parquet stream ends or is closed (its threads' shutdown)."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def epochs_read(batches: StreamingBatches, count: int) -> list[list[str]]:
    """The objects of the first ``count`` epochs, read one object per step."""
    assert batches.batch_size == 1
    epochs = [[] for _ in range(count)]
    for step in itertools.count():
        batches.batch(step)
        if batches.epoch == count:
            return epochs
        epochs[batches.epoch] += batches.last_object_ids


def test_shuffle_buffer_permutes_each_epoch_and_resumes_from_the_next(nmr, no_shutdown_sleep):
    uninterrupted = reader(nmr["sharded"], batch_size=1, shuffle_buffer=4)
    orders = epochs_read(uninterrupted, 2)
    for order in orders:
        assert sorted(order) == sorted(nmr["all_ids"])
    assert nmr["all_ids"] != orders[0] != orders[1]
    interrupted = reader(nmr["sharded"], batch_size=1, shuffle_buffer=4)
    read(interrupted, range(4))
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = reader(nmr["sharded"], batch_size=1, shuffle_buffer=4)
    resumed.load_state_dict(state)
    # The objects waiting in the buffer are not in the state: exact again from the next epoch on.
    assert epochs_read(resumed, 2)[1] == orders[1]
    for batches in (uninterrupted, interrupted, resumed):
        batches.close()


def test_categories_select_objects(nmr):
    batches = reader(nmr["sharded"], batch_size=6, categories=["chair"])
    batches.batch(0)
    chairs = [name for name in nmr["all_ids"] if name.startswith("03001627/")]
    assert batches.last_object_ids == chairs * 2
    batches.close()
    with pytest.raises(ValueError, match="category 'sofa' is not in"):
        reader(nmr["sharded"], categories=["sofa"])


def test_bad_image_size_is_a_clear_error(nmr):
    with pytest.raises(ValueError, match=r"image_size: .*parquet.* stores 32 px images.*got 24"):
        reader(nmr["parquet"], image_size=24)


def test_missing_columns_are_a_clear_error(nmr, tmp_path):
    train = datasets.load_from_disk(str(nmr["arrow"]))["train"].remove_columns(["camera_mat_inv"])
    train.to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(NMRFormatError, match=r"lacks the columns \['camera_mat_inv'\]"):
        reader(str(tmp_path))


def test_rows_of_the_wrong_shape_are_a_clear_error(tmp_path):
    views, matrices = 24, ("world_mat", "world_mat_inv", "camera_mat_inv")
    features = datasets.Features(
        {
            "object_id": datasets.Value("string"),
            "category": datasets.Value("string"),
            "images": datasets.Array4D((views, 8, 8, 1), "uint8"),
            **{key: datasets.Array3D((views, 4, 4), "float64") for key in matrices},
        }
    )
    row = {
        "object_id": ["02691156/gray"],
        "category": ["02691156"],
        "images": [np.zeros((views, 8, 8, 1), np.uint8)],
        **{key: [np.tile(np.eye(4), (views, 1, 1))] for key in matrices},
    }
    datasets.Dataset.from_dict(row, features=features).to_parquet(
        str(tmp_path / "data" / "train-00000-of-00001.parquet")
    )
    batches = reader(str(tmp_path), image_size=8, batch_size=1)
    expected = (
        r"object 02691156/gray: column 'images' should be a \(24, 8, 8, 3\) uint8 array, "
        r"got \(24, 8, 8, 1\) uint8"
    )
    with pytest.raises(NMRFormatError, match=expected):
        batches.batch(0)
    batches.close()


def test_a_load_error_names_the_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot stream split 'train'"):
        reader(str(tmp_path / "nothing-here"))


def test_open_storage_loads_a_hub_dataset_id(nmr, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no local folder named like the id
    asked = []

    def load_dataset(path, *args, **kwargs):
        asked.append(path)
        return datasets.load_from_disk(str(nmr["arrow"]))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    storage = open_storage(HUB_ID)
    local = open_storage(nmr["arrow"])
    assert asked == [HUB_ID]
    assert isinstance(storage, ArrowStorage) and storage.description == HUB_ID
    assert storage.image_size == STORED_SIZE
    assert storage.categories() == local.categories()
    assert storage.fingerprint() == local.fingerprint()
    synset, object_id = nmr["train_ids"][1].split("/")
    assert storage.object_ids(synset, "train") == [object_id]
    np.testing.assert_array_equal(storage.read_images(synset, object_id, [0, 5]),
                                  local.read_images(synset, object_id, [0, 5]))


def test_open_storage_names_a_hub_id_it_cannot_load(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)

    def offline(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    expected = (
        rf"^{HUB_ID}: no such local file or directory, and loading it as a Hugging Face Hub dataset failed "
        r"\(ConnectionError: Couldn't reach .*\)$"  # the first line of the error only
    )
    with pytest.raises(FileNotFoundError, match=expected):
        open_storage(HUB_ID)
    # Not an id: a missing path keeps its message, and the Hub is not asked.
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        open_storage(tmp_path / "missing" / "data")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        open_storage("./missing")
