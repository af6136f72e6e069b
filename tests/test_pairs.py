"""Training batches: independent random streams, pure functions of (seed, step, rank), one pair sampler."""

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from soda_diffusers.cameras import NMR_NUM_VIEWS, nmr_rays
from soda_diffusers.data import NMRObjects, StepBatches, ViewStore, make_synthetic_nmr
from soda_diffusers.data.pairs import STREAMS, draw_views, pair_batch, stream_generator, stream_seed

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train_soda.py"


def load_training_script():
    spec = importlib.util.spec_from_file_location("train_soda_for_pairs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    make_synthetic_nmr(root / "nmr", objects_per_category=3, seed=0, categories=["airplane", "car"])
    return ViewStore.open(root / "nmr", "train", 32, cache_dir=root / "stores", progress=False)


def agreement_sigmas(a: np.ndarray, b: np.ndarray, modulus: int, expected: float | None = None) -> float:
    """How many standard deviations the rate of ``a % m == b % m`` lies from what independent draws
    with these marginals give (or from ``expected``)."""
    ra, rb = a % modulus, b % modulus
    if expected is None:
        pa = np.bincount(ra, minlength=modulus) / len(a)
        pb = np.bincount(rb, minlength=modulus) / len(b)
        expected = float((pa * pb).sum())
    observed = float((ra == rb).mean())
    return abs(observed - expected) / math.sqrt(expected * (1 - expected) / len(a))


@pytest.mark.parametrize("timestep_bias", [False, True])
def test_objects_views_and_timesteps_are_pairwise_independent(timestep_bias):
    # The bug this guards against: objects and timesteps drawn from one seeded generator made
    # object % 8 == timestep % 8 hold for every draw (so each object saw one eighth of the noise levels).
    train = load_training_script()
    batches = StepBatches(SimpleNamespace(num_objects=312), batch_size=32, seed=0)
    probs = None
    if timestep_bias:
        args = train.parse_args(["--timestep_bias_strategy", "later", "--timestep_bias_multiplier", "6",
                                 "--timestep_bias_portion", "0.5"])
        probs = train.timestep_weights(args, 1000)
    draws = {"object": [], "source": [], "target": [], "timestep": []}
    for step in range(250):
        objects, views = batches.draws(step)
        timesteps = train.draw_timesteps(stream_generator(0, step, 0, "timesteps"), 32, 1000, probs)
        draws["object"].append(objects)
        draws["source"].append(views[:, 0])
        draws["target"].append(views[:, 1])
        draws["timestep"].append(timesteps)
    draws = {name: torch.cat(values).numpy() for name, values in draws.items()}
    assert (draws["source"] != draws["target"]).all()
    names = list(draws)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            for modulus in (2, 4, 8):
                # A target is any view but the source: equal residues for (24 / m - 1) of the 23 others.
                expected = (NMR_NUM_VIEWS / modulus - 1) / (NMR_NUM_VIEWS - 1) if {first, second} == {"source", "target"} else None
                sigmas = agreement_sigmas(draws[first], draws[second], modulus, expected)
                assert sigmas < 5, f"{first} and {second} agree mod {modulus} {sigmas:.1f} sigmas off chance"


def test_streams_are_distinct_and_reproducible():
    seeds = {stream_seed(0, 3, 0, stream) for stream in STREAMS}
    assert len(seeds) == len(STREAMS)
    assert stream_seed(0, 3, 0, "noise") == stream_seed(0, 3, 0, "noise")
    assert len({stream_seed(seed, step, rank, "views") for seed in (0, 1) for step in (0, 1) for rank in (0, 1)}) == 8
    assert all(0 <= seed < 2**63 for seed in seeds)
    with pytest.raises(ValueError, match="stream"):
        stream_seed(0, 0, 0, "brightness")


def test_a_step_batch_is_a_pure_function_of_seed_step_and_rank(store):
    first = StepBatches(store, 6, seed=3, rank=1).batch(17)
    again = StepBatches(store, 6, seed=3, rank=1)[17]
    for key in first:
        torch.testing.assert_close(first[key], again[key], atol=0, rtol=0)
    other_rank = StepBatches(store, 6, seed=3, rank=0).batch(17)
    assert not torch.equal(first["target_image"], other_rank["target_image"])
    # A DataLoader with workers gives the same batches, in step order.
    loader = torch.utils.data.DataLoader(StepBatches(store, 6, seed=3, rank=1), batch_size=None,
                                         sampler=range(15, 19), num_workers=2)
    batches = list(loader)
    assert len(batches) == 4
    for key in first:
        torch.testing.assert_close(batches[2][key], first[key], atol=0, rtol=0)


def test_batches_hold_the_stored_views_and_the_rays_of_nmr_rays(store, tmp_path_factory):
    batches = StepBatches(store, 5, seed=0, num_source_views=3)
    objects, views = batches.draws(2)
    batch = batches.pairs(objects, views)
    assert batch["source_image"].shape == (5, 3, 3, 32, 32) and batch["source_rays"].shape == (5, 3, 6, 32, 32)
    assert batch["target_image"].shape == (5, 3, 32, 32) and batch["target_rays"].shape == (5, 6, 32, 32)
    data = NMRObjects(store.manifest["fingerprint"]["source"], split="train", image_size=32)
    for row in range(5):
        obj = data[int(objects[row])]
        sources, target = views[row, :3].tolist(), int(views[row, 3])
        torch.testing.assert_close(batch["target_image"][row], obj["images"][target], atol=1e-6, rtol=0)
        torch.testing.assert_close(batch["source_image"][row], obj["images"][sources], atol=1e-6, rtol=0)
        # One ray function: the batch's rays are those evaluation computes from the object's cameras.
        torch.testing.assert_close(batch["target_rays"][row], nmr_rays(obj["cameras"], sources[0], [target], 32)[0],
                                   atol=0, rtol=0)
        torch.testing.assert_close(batch["source_rays"][row], nmr_rays(obj["cameras"], sources[0], sources, 32),
                                   atol=0, rtol=0)
    single = StepBatches(store, 5, seed=0).batch(2)
    assert single["source_image"].shape == (5, 3, 32, 32) and "source_rays" not in single


def test_view_draws_are_distinct_and_bad_counts_refused():
    views = draw_views(torch.Generator().manual_seed(0), 500, num_source_views=4)
    assert views.shape == (500, 5)
    assert all(len(set(row)) == 5 for row in views.tolist())
    for bad in (0, 24):
        with pytest.raises(ValueError, match="num_source_views"):
            draw_views(torch.Generator(), 1, bad)


def test_pair_batch_maps_uint8_to_the_model_range():
    images = torch.tensor([0, 255], dtype=torch.uint8).repeat_interleave(3 * 4 * 4).view(1, 2, 3, 4, 4)
    cameras = torch.eye(4, dtype=torch.float64).expand(1, 2, 4, 4)
    batch = pair_batch(images, cameras, cameras)
    assert batch["source_image"].min() == -1 and batch["target_image"].max() == 1
