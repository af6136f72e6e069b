"""The evaluation commands: the NVS protocol (sources never targets, scores against hand-computed ones,
resumption), FID, probes, and the ``sample`` / ``evaluate`` CLI outputs, on a small synthetic dataset."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TinyFeatures, make_tiny_pipeline
from torch import nn

from soda_diffusers import orbit_rays
from soda_diffusers.cli import main as cli_main
from soda_diffusers.data import NMRObjects, make_synthetic_nmr
from soda_diffusers.evaluation.runner import (
    BASELINES,
    NVS_METRICS,
    NVS_RECORDS_FILE,
    evaluate,
    evaluate_probe,
    generated_views_path,
    load_view_strip,
    read_nvs_records,
    run_nvs,
    select_objects,
)
from soda_diffusers.evaluation.views import generate_views_per_seed, view_seeds
from soda_diffusers.metrics import (
    LPIPS,
    PSNR_MAX,
    fid,
    fid_metric,
    foreground_color_error,
    foreground_color_error_parts,
    foreground_iou,
    light_grey_percent,
    psnr,
    ssim,
    ssim_pixelnerf,
)
from soda_diffusers.schedules import SCHEDULERS, set_scheduler

CATEGORIES = ["airplane", "car", "sofa"]
SIZE = 16  # the tiny pipeline's resolution


@pytest.fixture(scope="module")
def nmr(tmp_path_factory):
    # 3 objects per category: one each in train, val and test.
    return make_synthetic_nmr(tmp_path_factory.mktemp("nmr") / "nmr", 3, seed=0, categories=CATEGORIES)


@pytest.fixture(scope="module")
def test_objects(nmr):
    return NMRObjects(nmr, split="test", image_size=SIZE)


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline")
    make_tiny_pipeline().save_pretrained(path)
    return path


def tiny_lpips() -> LPIPS:
    torch.manual_seed(0)
    model = LPIPS(features=TinyFeatures(), channels=(8, 16))
    generator = torch.Generator().manual_seed(1)
    model.load_lin_state_dict({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator)
                               for i, c in enumerate((8, 16))})
    return model.eval()


class CoarseImageFeatures(nn.Module):
    """A small FID feature extractor: uint8 images -> their colours at 2x2 resolution (12 features)."""

    num_features = 12

    def forward(self, images):
        return nn.functional.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)


def ground_truth_generator(objects, seed: int):
    """A perfect generator: looks each target's true image up by its seed (one per object and view)."""
    truth = {}
    for obj in objects:
        for view, view_seed in enumerate(view_seeds(seed, obj["object_id"], range(24))):
            truth[view_seed] = obj["images"][view]

    def generate(pipe, source_images, target_rays, seeds, **kwargs):
        return torch.stack([truth[s] for s in seeds])

    return generate


def copy_source(pipe, source_images, target_rays, seeds, **kwargs):
    return source_images.clone()


# ------------------------------------------------------------------------------------------ helpers


def test_set_scheduler_keeps_the_training_schedule():
    pipe = make_tiny_pipeline()
    original = pipe.scheduler
    for name, scheduler_class in SCHEDULERS.items():
        set_scheduler(pipe, name)
        assert type(pipe.scheduler) is scheduler_class
        assert pipe.scheduler.config.prediction_type == original.config.prediction_type
        torch.testing.assert_close(pipe.scheduler.alphas_cumprod, original.alphas_cumprod)
    with pytest.raises(ValueError, match="ddim"):
        set_scheduler(pipe, "heun3")


def test_select_objects_round_robin_over_categories_and_nested():
    objects = SimpleNamespace(labels=[0, 0, 0, 1, 1, 2])
    assert select_objects(objects) == [0, 1, 2, 3, 4, 5]
    assert select_objects(objects, 3) == [0, 3, 5]
    assert select_objects(objects, 5) == [0, 1, 3, 4, 5]
    assert set(select_objects(objects, 3)) <= set(select_objects(objects, 4))
    with pytest.raises(ValueError):
        select_objects(objects, 0)


def test_generated_noise_does_not_depend_on_the_batch():
    pipe = make_tiny_pipeline()
    source = torch.rand(3, SIZE, SIZE) * 2 - 1
    rays = orbit_rays([15.0, 30.0, 45.0], size=SIZE)
    together = generate_views_per_seed(pipe, source, rays, [7, 8, 9], num_inference_steps=2)
    alone = generate_views_per_seed(pipe, source, rays[1:2], [8], num_inference_steps=2)
    # Equal up to float rounding (batched kernels sum in another order); other noise would differ by O(1).
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-3)
    assert (together[0] - together[1]).abs().max() > 0.1


# ------------------------------------------------------------------------------------------ NVS


def test_the_source_view_is_never_a_target(test_objects, tmp_path):
    sources_seen = []

    def check_rays(pipe, source_images, target_rays, seeds, **kwargs):
        # Rays are in the source camera's frame: the source view's own rays start at the origin.
        origins = target_rays[:, :3].flatten(2)
        assert origins.norm(dim=1).amin() > 0.1, "a target has the source camera"
        sources_seen.append(source_images)
        return torch.zeros_like(source_images)

    records = run_nvs(make_tiny_pipeline(), test_objects, tmp_path, generate=check_rays, batch_objects=2,
                      progress=False)
    assert len(records) == len(test_objects) == 3
    # Two passes per batch: the model from each object's source, the other-source baseline from the next one's.
    assert sum(len(s) for s in sources_seen) == 2 * 3 * 23
    for record, obj in zip(records, test_objects):
        assert record["object_id"] == obj["object_id"]
        assert record["source_view"] not in record["target_views"]
        assert sorted(record["target_views"] + [record["source_view"]]) == list(range(24))
        assert all(len(record[name]) == 23 for name in NVS_METRICS if name != "lpips") and record["lpips"] is None
        assert list(record["baselines"]) == list(BASELINES)


def test_a_perfect_generator_scores_the_caps(nmr, test_objects, tmp_path):
    results = evaluate(
        make_tiny_pipeline(),
        nmr,
        tmp_path,
        ["nvs", "fid"],
        lpips_model=tiny_lpips(),
        fid_extractor=CoarseImageFeatures(),
        generate=ground_truth_generator(test_objects, seed=0),
        progress=False,
    )
    nvs = results["nvs"]
    assert nvs["psnr"] == PSNR_MAX
    assert nvs["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert nvs["lpips"] == pytest.approx(0.0, abs=1e-7)
    assert nvs["objects"] == 3 and nvs["views_per_object"] == 23
    assert {row["name"] for row in nvs["per_category"].values()} == set(CATEGORIES)
    assert all(row["psnr"] == PSNR_MAX for row in nvs["per_category"].values())
    for record in read_nvs_records(tmp_path / NVS_RECORDS_FILE).values():
        assert record["psnr"] == [PSNR_MAX] * 23
    assert results["fid"]["images"] == 3 * 23 and abs(results["fid"]["fid"]) < 1e-3
    assert nvs["fg_iou"] == 1.0 and nvs["fg_color_error"] == 0.0
    assert nvs["ssim_pixelnerf"] == pytest.approx(1.0, abs=1e-6)
    baselines = nvs["baselines"]
    assert list(baselines) == list(BASELINES)
    # The generator ignores the source view: given another object's, it is just as perfect.
    assert baselines["other_source"]["psnr"] == PSNR_MAX and baselines["other_source"]["fg_iou"] == 1.0
    for name in ("copy_source", "mean_image"):
        assert baselines[name]["psnr"] < 40 and baselines[name]["fg_iou"] < 0.95
        assert baselines[name]["fg_color_error"] > 0 and baselines[name]["lpips"] > 0
        assert set(baselines[name]["per_category"]) == set(nvs["per_category"])


def test_copy_source_scores_what_the_metrics_give_by_hand(nmr, tmp_path):
    objects = NMRObjects(nmr, split="test", image_size=SIZE)
    chosen = {object_id: view for object_id, view in zip(objects.object_ids, (0, 11, 23))}
    view_list = tmp_path / "views.txt"
    view_list.write_text("".join(f"{oid.replace('/', ' ')} {view}\n" for oid, view in chosen.items()))
    lpips_model = tiny_lpips()
    results = evaluate(make_tiny_pipeline(), nmr, tmp_path / "out", ["nvs", "fid"], view_list=view_list,
                       lpips_model=lpips_model, fid_extractor=CoarseImageFeatures(), generate=copy_source,
                       progress=False)

    expected, real_views, copied_views = {}, [], []
    direct = {"psnr": psnr, "ssim": ssim, "ssim_pixelnerf": ssim_pixelnerf, "fg_iou": foreground_iou,
              "fg_color_error": foreground_color_error,
              "fg_brightness_error": lambda a, b: foreground_color_error_parts(a, b)[0],
              "fg_chroma_error": lambda a, b: foreground_color_error_parts(a, b)[1],
              "light_grey": lambda a, b: light_grey_percent(a), "target_light_grey": lambda a, b: light_grey_percent(b)}
    for obj in objects:
        source_view = chosen[obj["object_id"]]
        targets = torch.cat([obj["images"][:source_view], obj["images"][source_view + 1 :]])
        source = obj["images"][source_view].expand_as(targets)
        real_views.append((targets + 1) / 2)
        copied_views.append((source + 1) / 2)
        with torch.no_grad():
            expected[obj["category"]] = {
                **{name: f((source + 1) / 2, (targets + 1) / 2).mean().item() for name, f in direct.items()},
                "lpips": lpips_model(source, targets).mean().item(),
            }
    nvs = results["nvs"]
    for category, row in nvs["per_category"].items():
        for metric in NVS_METRICS:
            assert row[metric] == pytest.approx(expected[category][metric], rel=1e-5, abs=1e-6)
            # The generator copies the source: the model is its own copy-source baseline.
            assert nvs["baselines"]["copy_source"]["per_category"][category][metric] == row[metric]
    for metric in NVS_METRICS:
        assert nvs[metric] == pytest.approx(np.mean([e[metric] for e in expected.values()]), rel=1e-5, abs=1e-6)
    assert 5 < nvs["psnr"] < 40 and nvs["lpips"] > 0
    records = read_nvs_records(tmp_path / "out" / NVS_RECORDS_FILE)
    assert {oid: r["source_view"] for oid, r in records.items()} == chosen
    expected_fid = fid(fid_metric(CoarseImageFeatures()), torch.cat(real_views), torch.cat(copied_views))
    assert results["fid"]["fid"] == pytest.approx(expected_fid, rel=1e-6) and expected_fid > 1e-3
    # The saved generated views are the copies, as 8-bit images.
    obj = objects[1]
    saved = load_view_strip(generated_views_path(tmp_path / "out", obj["object_id"]), 23)
    source_uint8 = ((obj["images"][11] + 1) / 2 * 255).round().to(torch.uint8)
    assert torch.equal(saved, source_uint8.expand(23, -1, -1, -1))

    # The baselines of one object, computed directly: copy its source; the mean of every train view;
    # the next object's source view through the (copying) generator.
    record = records[obj["object_id"]]
    targets = (obj["images"][record["target_views"]] + 1) / 2
    train = NMRObjects(nmr, split="train", image_size=SIZE)
    mean_image = (torch.stack([o["images"] for o in train]).double().mean(dim=(0, 1)).float() + 1) / 2
    donor = objects[2]
    predictions = {
        "copy_source": (obj["images"][11] + 1) / 2,
        "mean_image": mean_image,
        "other_source": (donor["images"][chosen[donor["object_id"]]] + 1) / 2,
    }
    assert record["baselines"]["other_source"]["source_object"] == donor["object_id"]
    assert record["baselines"]["other_source"]["source_view"] == chosen[donor["object_id"]]
    for name, prediction in predictions.items():
        scores = record["baselines"][name]
        prediction = prediction.expand_as(targets)
        assert scores["psnr"] == pytest.approx(psnr(prediction, targets).tolist(), rel=1e-5)
        assert scores["fg_iou"] == pytest.approx(foreground_iou(prediction, targets).tolist(), abs=1e-6)
        assert scores["lpips"] == pytest.approx(lpips_model(prediction * 2 - 1, targets * 2 - 1).tolist(), rel=1e-4)
    # The last object's "other" source is the first object's.
    last = records[objects.object_ids[2]]["baselines"]["other_source"]
    assert last["source_object"] == objects.object_ids[0] and last["source_view"] == 0

    written = json.loads((tmp_path / "out" / "metrics.json").read_text())["nvs"]
    assert set(written["baselines"]) == set(BASELINES)
    for row in (written, *written["baselines"].values()):
        assert set(NVS_METRICS) <= set(row) and all(isinstance(row[m], float) for m in NVS_METRICS)
    assert written["baselines"]["copy_source"]["psnr"] == pytest.approx(nvs["psnr"])
    report = (tmp_path / "out" / "metrics.md").read_text()
    for text in ("SSIM (pixelNeRF)", "FG IoU", "FG colour error", "| **SODA** |", "| copy the source view |",
                 "| mean training image |", "| SODA, another object's source view |"):
        assert text in report
    copy_row = next(line for line in report.splitlines() if line.startswith("| copy the source view |"))
    assert f"| {nvs['psnr']:.2f} |" in copy_row


def test_an_interrupted_evaluation_resumes_where_it_stopped(test_objects, tmp_path):
    pipe = make_tiny_pipeline()
    options = dict(num_inference_steps=2, batch_objects=2, progress=False)
    uninterrupted = run_nvs(pipe, test_objects, tmp_path / "whole", **options)

    class Interrupted(Exception):
        pass

    generated_objects, calls = [], []

    def interrupt_after(k):
        """Raise on the pipeline call after the k-th (each batch makes two: the model's pass and the
        other-source baseline's)."""

        def generate(pipe, source_images, target_rays, seeds, **kwargs):
            if len(calls) >= k:
                raise Interrupted
            calls.append(len(seeds))
            generated_objects.extend(range(len(seeds) // 23))
            return generate_views_per_seed(pipe, source_images, target_rays, seeds, **kwargs)

        return generate

    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        run_nvs(pipe, test_objects, out, generate=interrupt_after(3), **options)  # in the second batch
    lines = (out / NVS_RECORDS_FILE).read_text().splitlines()
    assert len(lines) == 2
    # A run killed in the middle of writing a line leaves it unfinished.
    with open(out / NVS_RECORDS_FILE, "a") as handle:
        handle.write('{"object_id": "02958343/unfinished", "psnr": [1')

    generated_objects.clear()
    calls.clear()
    resumed = run_nvs(pipe, test_objects, out, generate=interrupt_after(10), **options)
    assert len(generated_objects) == 2, "only the object left was generated again (and its baseline)"
    lines = (out / NVS_RECORDS_FILE).read_text().splitlines()
    ids = [json.loads(line)["object_id"] for line in lines]
    assert sorted(ids) == sorted(test_objects.object_ids)
    for whole, again in zip(uninterrupted, resumed):
        assert whole["object_id"] == again["object_id"] and whole["source_view"] == again["source_view"]
        assert again["psnr"] == pytest.approx(whole["psnr"], rel=1e-5)
        assert again["ssim"] == pytest.approx(whole["ssim"], rel=1e-4, abs=1e-6)
        for name in BASELINES:
            assert again["baselines"][name]["psnr"] == pytest.approx(whole["baselines"][name]["psnr"], rel=1e-4)

    # Other batch sizes draw the same noise for the same views.
    one_at_a_time = run_nvs(pipe, test_objects, tmp_path / "single", **{**options, "batch_objects": 1})
    for whole, single in zip(uninterrupted, one_at_a_time):
        assert single["psnr"] == pytest.approx(whole["psnr"], rel=1e-4)

    with pytest.raises(ValueError, match="num_inference_steps"):
        run_nvs(pipe, test_objects, out, **{**options, "num_inference_steps": 3})


def test_a_pipeline_loaded_from_an_export_keeps_its_name_and_its_evaluation_resumes(saved_pipeline, test_objects, tmp_path):
    # Exported folders load through a temporary mirror; the pipeline must still name the folder the user
    # gave, or the evaluation's resume settings would name a deleted temporary folder and refuse to resume.
    from soda_diffusers import SODANovelViewPipeline

    export = tmp_path / "export"
    assert cli_main(["push", "--pipeline", str(saved_pipeline), "--repo-id", "someone/tiny", "--dry-run", str(export)]) == 0
    assert isinstance(json.loads((export / "model_index.json").read_text())["_class_name"], list)  # bundled code
    first = SODANovelViewPipeline.from_pretrained(export)
    assert first.name_or_path == str(export) and first.unet.config._name_or_path == str(export / "unet")
    options = dict(num_inference_steps=2, batch_objects=3, progress=False, baselines=("copy_source",))
    records = run_nvs(first, test_objects, tmp_path / "eval", **options)
    calls = []

    def generate(*args, **kwargs):
        calls.append(1)
        return generate_views_per_seed(*args, **kwargs)

    again = run_nvs(SODANovelViewPipeline.from_pretrained(export), test_objects, tmp_path / "eval", generate=generate, **options)
    assert calls == [] and [r["psnr"] for r in again] == [r["psnr"] for r in records]


def test_the_costly_baseline_can_be_skipped(test_objects, tmp_path):
    calls = []

    def generate(pipe, source_images, target_rays, seeds, **kwargs):
        calls.append(len(seeds))
        return source_images.clone()

    options = dict(generate=generate, batch_objects=3, progress=False)
    records = run_nvs(make_tiny_pipeline(), test_objects, tmp_path, baselines=("mean_image", "copy_source"),
                      **options)
    assert calls == [3 * 23], "one pipeline call: no second pass for the other-source baseline"
    assert all(list(record["baselines"]) == ["copy_source", "mean_image"] for record in records)
    # Resuming asks for the same baselines: a record without one could not be averaged with the others.
    with pytest.raises(ValueError, match="baselines"):
        run_nvs(make_tiny_pipeline(), test_objects, tmp_path, **options)
    with pytest.raises(ValueError, match="no_model"):
        run_nvs(make_tiny_pipeline(), test_objects, tmp_path / "other", baselines=("no_model",), **options)
    none = run_nvs(make_tiny_pipeline(), test_objects, tmp_path / "none", baselines=(), **options)
    assert all(record["baselines"] == {} for record in none)


def test_probe_results(nmr):
    pipe = make_tiny_pipeline()
    train = NMRObjects(nmr, split="train", image_size=SIZE)
    test = NMRObjects(nmr, split="test", image_size=SIZE)
    state = torch.random.get_rng_state()
    probe = evaluate_probe(pipe, train, test, seed=0, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state), "the random encoder must not move the global RNG"
    assert set(probe) >= {"linear_acc", "knn_acc", "random_encoder", "train_objects", "test_objects"}
    assert set(probe["random_encoder"]) == {"linear_acc", "knn_acc"}
    assert probe["train_objects"] == 3 and probe["test_objects"] == 3 and probe["feature_dim"] == 12
    assert probe["categories"] == CATEGORIES
    for value in (probe["linear_acc"], probe["knn_acc"], *probe["random_encoder"].values()):
        # 3 test objects: an accuracy is a multiple of 1/3
        assert 0 <= value <= 1 and value * 3 == pytest.approx(round(value * 3))
    assert evaluate_probe(pipe, train, test, seed=0, progress=False) == probe


# ------------------------------------------------------------------------------------------ CLI


def test_cli_sample_writes_grids_and_orbits(nmr, saved_pipeline, test_objects, tmp_path):
    object_id = test_objects.object_ids[1]
    out = tmp_path / "sample"
    code = cli_main(["sample", "--pipeline", str(saved_pipeline), "--data", str(nmr), "--out", str(out),
                     "--object", object_id, "--source-view", "5", "--steps", "2", "--scheduler", "dpmsolver"])
    assert code == 0
    name = object_id.replace("/", "-")
    files = {kind: out / f"{name}-{kind}" for kind in ("real.png", "source.png", "gen.png", "real.gif", "gen.gif")}
    assert all(path.is_file() for path in files.values())
    assert PIL.Image.open(files["gen.gif"]).n_frames == 24
    real, gen = (np.asarray(PIL.Image.open(files[k]).convert("RGB")) for k in ("real.png", "gen.png"))
    assert real.shape == gen.shape

    def tile(grid, view, scale=2, padding=1):
        row, column = divmod(view, 8)
        step = SIZE * scale + padding
        return grid[padding + row * step : row * step + step, padding + column * step : column * step + step]

    assert np.array_equal(tile(gen, 5), tile(real, 5)), "the source view sits in its place"
    assert not np.array_equal(tile(gen, 6), tile(real, 6))

    # without an object: a seeded random one
    assert cli_main(["sample", "--pipeline", str(saved_pipeline), "--data", str(nmr), "--out", str(tmp_path / "r"),
                     "--steps", "1", "--seed", "3"]) == 0
    assert len(list((tmp_path / "r").iterdir())) == 5


def test_cli_evaluate_all_writes_the_documented_outputs(nmr, saved_pipeline, tmp_path, monkeypatch):
    # No pretrained weights anywhere, whatever this machine holds: LPIPS null, FID skipped.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    for variable in ("SODA_LPIPS_VGG", "SODA_FID_INCEPTION"):
        monkeypatch.delenv(variable, raising=False)
    out = tmp_path / "eval"
    code = cli_main(["evaluate", "--pipeline", str(saved_pipeline), "--data", str(nmr), "--type", "all",
                     "--out", str(out), "--steps", "2", "--limit", "2", "--batch-objects", "2"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"nvs", "probe", "fid"}
    nvs = metrics["nvs"]
    assert {"psnr", "ssim", "lpips", "objects", "views_per_object", "per_category"} <= set(nvs)
    assert nvs["lpips"] is None and "vgg16" in nvs["lpips_skipped"]
    assert nvs["objects"] == 2 and nvs["views_per_object"] == 23 and len(nvs["per_category"]) == 2
    assert all(isinstance(nvs[name], float) for name in NVS_METRICS if name != "lpips")
    assert set(nvs["baselines"]) == set(BASELINES)
    assert all(len(row["per_category"]) == 2 for row in nvs["baselines"].values())
    assert {"linear_acc", "knn_acc", "random_encoder"} <= set(metrics["probe"])
    assert set(metrics["probe"]["random_encoder"]) == {"linear_acc", "knn_acc"}
    assert metrics["fid"]["fid"] is None and "SODA_FID_INCEPTION" in metrics["fid"]["skipped"]
    report = (out / "metrics.md").read_text()
    assert "airplane" in report and "car" in report and "FID" in report and "random init" in report
    assert "mean training image" in report and "FG IoU" in report
    for plot in ("nvs_psnr.png", "nvs_ssim.png", "nvs_fg_iou.png", "nvs_baselines_psnr.png", "probe.png"):
        assert PIL.Image.open(out / plot).size[0] >= 320
    assert not (out / "nvs_lpips.png").exists()
