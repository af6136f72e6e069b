"""Evaluation of a SODA pipeline on NMR-format data: novel view synthesis, FID, and probes of the encoder.

* **nvs**, the single-view protocol of pixelNeRF: every object of the test split (or ``limit`` of them),
  one source view per object (from a pixelNeRF view list such as ``src_dvr.txt``, else
  :func:`~soda_diffusers.evaluation.views.seeded_view`), the 23 other views as targets. PSNR and SSIM on
  images in [0, 1] (SSIM: Gaussian 11x11 window, sigma 1.5, valid region: see :func:`metrics.ssim`;
  and as pixelNeRF computed it, :func:`metrics.ssim_pixelnerf`), LPIPS (VGG) on [-1, 1] when its
  weights are on this machine, and what a person sees: the IoU of the object silhouettes and the
  distance between the mean object colours (:func:`metrics.foreground_iou`,
  :func:`metrics.foreground_color_error`); averaged per object over its 23 views, then over objects,
  overall and per category (:func:`metrics.aggregate`). The same targets are scored against
  **baselines** (:data:`BASELINES`) that no useful model should lose to: the source view copied to
  every target, the mean training image, and the model itself given another object's source view.
* **fid**: FID between the generated and the real target views of the same objects and views.
* **probe**: linear and kNN classification of the category from frozen encoder latents of one view
  per object, trained on the train split and scored on the test split, beside the same probes on a
  randomly initialised encoder of the same architecture.

The NVS pass generates several objects' targets in one pipeline call and is resumable: each object's
scores and its baselines' scores are appended as one JSON line to ``nvs_objects.jsonl`` (its generated
views saved first, as a PNG strip under ``generated/``), and a rerun skips the objects already there.
Each target's starting noise depends only on ``(seed, object, view)``
(:func:`~soda_diffusers.evaluation.views.view_seeds`), so the batch size and where a run was interrupted do
not change what is generated.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import nn
from tqdm.auto import tqdm

from soda_diffusers.cameras import nmr_rays
from soda_diffusers.data import NMRObjects, ViewStore
from soda_diffusers.evaluation.views import (
    generate_views_per_seed,
    light_grey_ratio,
    seeded_view,
    target_views,
    view_scores,
    view_seeds,
)
from soda_diffusers.metrics import (
    FOREGROUND_THRESHOLD,
    LPIPS,
    MissingWeightsError,
    aggregate,
    fid,
    fid_metric,
    to_uint8,
)
from soda_diffusers.probe import knn_probe, linear_probe
from soda_diffusers.visualize import make_grid, plot_bars

EVALUATION_TYPES = ("nvs", "probe", "fid")
NVS_RECORDS_FILE = "nvs_objects.jsonl"
NVS_SETTINGS_FILE = "nvs_settings.json"
GENERATED_DIR = "generated"
SSIM_WINDOW = "Gaussian 11x11, sigma 1.5, valid region"
SSIM_PIXELNERF_WINDOW = "uniform 7x7, sample covariance, valid region (skimage's defaults, as in pixelNeRF)"
FOREGROUND = "darkest channel at most 239 of 255 (metrics.FOREGROUND_THRESHOLD)"
# Per target view, in the records and the summaries: those of view_scores (VIEW_METRICS) and LPIPS.
NVS_METRICS = ("psnr", "ssim", "ssim_pixelnerf", "lpips", "fg_iou", "fg_color_error", "fg_brightness_error",
               "fg_chroma_error", "light_grey", "target_light_grey")
# Predictions of the same targets that a model must beat to be doing novel view synthesis at all:
# the source view copied to every target (no 3D at all), the mean of all training views (the best
# constant image in squared error), and the model given another test object's source view (the same
# cameras and noise: what it draws without looking at this object).
BASELINES = ("copy_source", "mean_image", "other_source")
BASELINE_TITLES = {
    "copy_source": "copy the source view",
    "mean_image": "mean training image",
    "other_source": "SODA, another object's source view",
}
BASELINE_DESCRIPTIONS = {
    "copy_source": "the source view copied to every target",
    "mean_image": "the mean of all training views",
    "other_source": "SODA given the source view of another test object (the next one of the split), "
    "with the same cameras and noise",
}


# --------------------------------------------------------------------------------------- objects


def select_objects(objects, limit: int | None = None) -> list[int]:
    """Indices of the objects to evaluate, in dataset order: all of them, or ``limit`` taken round-robin
    over the categories (each category's first object, then each one's second, ...), so that every
    category is represented and a larger limit evaluates a superset of a smaller one."""
    labels = list(objects.labels)
    if limit is None or limit >= len(labels):
        return list(range(len(labels)))
    if limit < 1:
        raise ValueError(f"limit: expected a positive number of objects, got {limit}")
    seen = Counter()
    order = []
    for index, label in enumerate(labels):
        order.append((seen[label], label, index))
        seen[label] += 1
    return sorted(index for _, _, index in sorted(order)[:limit])


def source_view_for(objects, index: int, seed: int) -> int:
    """The source view of object ``index``: the view list's when ``objects`` has one, else :func:`seeded_view`."""
    if objects.source_views is not None:
        return int(objects.source_views[index])
    return seeded_view(seed, objects.object_ids[index])


def generated_views_path(out_dir: str | os.PathLike, object_id: str) -> Path:
    """Where the NVS pass keeps an object's generated target views: ``generated/<synset>/<object>.png``."""
    return Path(out_dir) / GENERATED_DIR / f"{object_id}.png"


def save_view_strip(images: torch.Tensor, path: Path) -> None:
    """Views ``(N, 3, H, W)`` in [-1, 1] side by side in one PNG, 8-bit as FID sees them (written under a
    temporary name first, so that a killed run never leaves a half-written file under the real one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    make_grid(images, columns=len(images), padding=0).save(partial, format="PNG")
    os.replace(partial, path)


def load_view_strip(path: Path, num_views: int) -> torch.Tensor:
    """The views of :func:`save_view_strip` as uint8 ``(N, 3, H, W)``."""
    strip = torch.from_numpy(np.array(PIL.Image.open(path).convert("RGB"))).permute(2, 0, 1)
    if strip.shape[2] % num_views:
        raise ValueError(f"{path}: a strip {strip.shape[2]} px wide cannot hold {num_views} views")
    return torch.stack(strip.chunk(num_views, dim=2))


# --------------------------------------------------------------------------------------- NVS records


def read_nvs_records(path: str | os.PathLike) -> dict[str, dict]:
    """The per-object records of ``nvs_objects.jsonl`` by object id (complete lines only)."""
    path = Path(path)
    if not path.is_file():
        return {}
    records = {}
    lines = path.read_text(encoding="utf-8").split("\n")
    for number, line in enumerate(lines[:-1], start=1):  # the part after the last newline is unfinished
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not a JSON record ({error})") from None
        records[record["object_id"]] = record
    return records


def _drop_unfinished_line(path: Path) -> None:
    # A run killed in the middle of a write leaves a last line without its newline; appending after it
    # would glue the next record onto it. That object is simply evaluated again.
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def _check_settings(out_dir: Path, settings: dict) -> None:
    """Refuse to resume records made with other settings (their averages would mix two evaluations)."""
    settings_path, records_path = out_dir / NVS_SETTINGS_FILE, out_dir / NVS_RECORDS_FILE
    if settings_path.is_file() and read_nvs_records(records_path):
        previous = json.loads(settings_path.read_text())
        changed = [
            f"{key} {previous.get(key)!r} -> {value!r}" for key, value in settings.items() if previous.get(key) != value
        ]
        if changed:
            raise ValueError(
                f"{records_path} holds results made with other settings ({'; '.join(changed)}): "
                "use another output directory, or remove it to start over"
            )
    settings_path.write_text(json.dumps(settings, indent=2) + "\n")


def _pipeline_name(pipe) -> str | None:
    name = pipe.name_or_path
    if not name:
        return None
    # A local directory by its absolute path, so that a rerun from elsewhere still matches; a Hub id as is.
    return str(Path(name).resolve()) if Path(name).is_dir() else str(name)


def nvs_settings(
    pipe, objects, seed: int, num_inference_steps: int, guidance_scale: float, lpips_model,
    baselines: Sequence[str] = BASELINES,
) -> dict:
    """What an NVS record depends on besides the object: a resumed run must match it. The metric names
    and the foreground threshold are part of it, so that records scored with older definitions are
    never averaged with new ones."""
    return {
        "pipeline": _pipeline_name(pipe),
        "scheduler": type(pipe.scheduler).__name__,
        "num_inference_steps": int(num_inference_steps),
        "guidance_scale": float(guidance_scale),
        "seed": int(seed),
        "image_size": int(objects.image_size),
        "source_views": "from a view list" if objects.source_views is not None else f"seeded, seed {int(seed)}",
        "lpips": None if lpips_model is None else type(lpips_model).__name__,
        "metrics": list(NVS_METRICS),
        "foreground_threshold": FOREGROUND_THRESHOLD,
        "baselines": list(baselines),
    }


def check_baselines(baselines: Iterable[str]) -> list[str]:
    """``baselines`` as a list in the order of :data:`BASELINES` (an unknown name is a ValueError)."""
    baselines = set(baselines)
    unknown = sorted(baselines - set(BASELINES))
    if unknown:
        raise ValueError(f"baselines: expected some of {BASELINES}, got {unknown}")
    return [name for name in BASELINES if name in baselines]


def other_object(objects, index: int) -> int:
    """The object whose source view the ``other_source`` baseline gives the model for object ``index``: the
    next one of the split in dataset order (the last one's is the first). A function of the object alone,
    not of which objects a ``limit`` selects, so that resumed runs agree; dataset order groups categories,
    so it is mostly an object of the same category: the baseline measures what the model takes from
    this object's source view beyond its category."""
    return (int(index) + 1) % len(objects)


def training_mean_image(objects, progress: bool = True) -> torch.Tensor:
    """The ``mean_image`` baseline: the mean of every view of every train-split object of ``objects``' data
    and categories, ``(3, S, S)`` in [-1, 1], from the train split's view store (built on first use)."""
    storage, size, categories = objects.storage, objects.image_size, objects.categories
    return ViewStore.open(storage, "train", size, categories, progress=progress).mean_image()


GenerateFn = Callable[..., torch.Tensor]


def target_inputs(obj: dict, source_view: int, views: Sequence[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """What the NVS protocol gives the pipeline for ``views`` of an object seen from ``source_view``: the
    source image once per view, the views' rays in the source camera's frame, and their noise seeds."""
    source = obj["images"][source_view].expand(len(views), -1, -1, -1)
    rays = nmr_rays(obj["cameras"], source_view, views, obj["images"].shape[-1])
    return source, rays, view_seeds(seed, obj["object_id"], views)


class PairScorer:
    """A fixed set of (source view, target view) pairs of a split, scored as :func:`run_nvs` scores them:
    the objects of ``select_objects(objects, num_objects)``, their protocol source views, and
    ``views_per_object`` of their targets spread around the orbit, with the same rays, noise seeds and
    metrics. So the scores equal ``soda-nvs evaluate``'s on those views; training logs them as it goes.

    ``scores(images)`` averages :func:`view_scores` over the pairs (the same views per object: per
    object, then over objects, is the plain mean). ``pairs``: ``(object_id, source_view, target_view)`` of each."""

    def __init__(self, objects, num_objects: int = 8, views_per_object: int = 4, seed: int = 0):
        if views_per_object < 1:
            raise ValueError(f"views_per_object: expected at least 1, got {views_per_object}")
        sources, rays, seeds, targets, self.pairs = [], [], [], [], []
        for index in select_objects(objects, num_objects):
            obj = objects[index]
            source_view = source_view_for(objects, index, seed)
            views = target_views(source_view, obj["images"].shape[0])
            views = [views[i * len(views) // views_per_object] for i in range(min(views_per_object, len(views)))]
            source, ray, view_seed = target_inputs(obj, source_view, views, seed)
            sources.append(source)
            rays.append(ray)
            seeds += view_seed
            targets.append(obj["images"][views])
            self.pairs += [(obj["object_id"], source_view, view) for view in views]
        self.sources, self.rays, self.seeds = torch.cat(sources), torch.cat(rays), seeds
        self.targets = torch.cat(targets)

    @classmethod
    def from_data(cls, data, split: str, image_size: int, num_objects: int = 8, views_per_object: int = 4,
                  seed: int = 0, **objects_kwargs) -> PairScorer:
        """Pairs of ``split`` of the NMR-format ``data``, read as ``soda-nvs evaluate`` reads it."""
        objects = NMRObjects(data, split=split, image_size=image_size, store=True, view_list="stored",
                             **objects_kwargs)
        return cls(objects, num_objects, views_per_object, seed)

    def __len__(self) -> int:
        return len(self.seeds)

    def generate(self, pipe, num_inference_steps: int, generate: GenerateFn = generate_views_per_seed,
                 **pipe_kwargs) -> torch.Tensor:
        """The pipeline's views of every pair, ``(N, 3, S, S)`` in [-1, 1]."""
        return generate(pipe, self.sources, self.rays, self.seeds, num_inference_steps=num_inference_steps,
                        **pipe_kwargs)

    def scores(self, images: torch.Tensor) -> dict[str, float]:
        return {name: math.fsum(values) / len(values) for name, values in view_scores(images, self.targets).items()}

    @functools.cached_property
    def copy_source_scores(self) -> dict[str, float]:
        """The scores of copying the source view to each target: the baseline a model must beat."""
        return self.scores(self.sources)


@torch.no_grad()
def run_nvs(
    pipe,
    objects,
    out_dir: str | os.PathLike,
    *,
    limit: int | None = None,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    batch_objects: int = 4,
    lpips_model: nn.Module | None = None,
    generate: GenerateFn = generate_views_per_seed,
    baselines: Sequence[str] = BASELINES,
    mean_image: torch.Tensor | None = None,
    progress: bool = True,
) -> list[dict]:
    """Generate and score the target views of the objects of ``objects`` (an ``NMRObjects``, at the
    pipeline's resolution; with a ``view_list`` its source views are used), and score the
    ``baselines`` on the same targets, resuming a previous run in ``out_dir``. Returns the records of
    the selected objects (:func:`select_objects`), in dataset order::

        {"object_id", "category", "source_view", "target_views": [23 views],
         "psnr": [per target view], "ssim", "ssim_pixelnerf", "fg_iou", "fg_color_error": [...],
         "lpips": [...] or None,
         "baselines": {name: {the same metrics}; "other_source" also has "source_object", "source_view"}}

    ``batch_objects`` objects (23 targets each, each with its own source image) go through one
    pipeline call. ``lpips_model``: an LPIPS module (e.g. ``LPIPS.from_pretrained()``), or None to skip
    LPIPS. ``generate(pipe, source_images, target_rays, seeds, num_inference_steps=..., guidance_scale=...)``
    returns the generated views in [-1, 1] (default: :func:`generate_views_per_seed`).

    ``baselines``: some of :data:`BASELINES`. ``copy_source`` and ``mean_image`` cost nothing but their
    scores; ``other_source`` generates every target a second time, from the source view of
    :func:`other_object` with the same rays and seeds: leave it out for a run at half the cost.
    ``mean_image``: the ``(3, S, S)`` image of that baseline, default :func:`training_mean_image`.
    The baselines are part of the settings a resumed run must match.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = pipe.unet.config.sample_size
    if objects.image_size != size:
        raise ValueError(f"objects: images are {objects.image_size} px, the pipeline generates {size} px")
    if batch_objects < 1:
        raise ValueError(f"batch_objects: expected at least 1, got {batch_objects}")
    baselines = check_baselines(baselines)
    if "other_source" in baselines and len(objects) < 2:
        raise ValueError("baselines: other_source needs at least two objects in the split; leave it out")
    settings = nvs_settings(pipe, objects, seed, num_inference_steps, guidance_scale, lpips_model, baselines)
    _check_settings(out_dir, settings)
    records_path = out_dir / NVS_RECORDS_FILE
    _drop_unfinished_line(records_path)

    object_ids = objects.object_ids
    selected = select_objects(objects, limit)
    done = read_nvs_records(records_path)
    source_views = {index: source_view_for(objects, index, seed) for index in selected}
    for index in selected:
        record = done.get(object_ids[index])
        if record is not None and record["source_view"] != source_views[index]:
            raise ValueError(
                f"{records_path}: {object_ids[index]} was evaluated from source view {record['source_view']}, "
                f"this run uses view {source_views[index]}: use another output directory, or remove it to start over"
            )
    pending = [index for index in selected if object_ids[index] not in done]
    lpips_device = None if lpips_model is None else next(lpips_model.parameters()).device
    if "mean_image" in baselines and pending and mean_image is None:
        mean_image = training_mean_image(objects, progress=progress)

    def scores(predictions: torch.Tensor, targets: torch.Tensor) -> dict:
        lpips = None
        if lpips_model is not None:
            lpips = lpips_model(predictions.to(lpips_device), targets.to(lpips_device)).tolist()
        return {**view_scores(predictions, targets), "lpips": lpips}

    sampling = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
    with (
        open(records_path, "a", encoding="utf-8") as handle,
        tqdm(total=len(selected), initial=len(selected) - len(pending), unit="object", desc="nvs",
             disable=not progress) as bar,
    ):
        for start in range(0, len(pending), batch_objects):
            batch_indices = pending[start : start + batch_objects]
            batch = [objects[index] for index in batch_indices]
            sources, rays, seeds, views_of = [], [], [], []
            for index, obj in zip(batch_indices, batch):
                source_view = source_views[index]
                views = target_views(source_view, obj["images"].shape[0])
                views_of.append(views)
                source, ray, view_seed = target_inputs(obj, source_view, views, seed)
                sources.append(source)
                rays.append(ray)
                seeds += view_seed
            sizes = [len(views) for views in views_of]
            generated = generate(pipe, torch.cat(sources), torch.cat(rays), seeds, **sampling).split(sizes)

            donors, other_generated = [], []
            if "other_source" in baselines:
                loaded = dict(zip(batch_indices, batch))
                donor_sources = []
                for index, views in zip(batch_indices, views_of):
                    donor = other_object(objects, index)
                    donor_view = source_view_for(objects, donor, seed)
                    donor_images = (loaded[donor] if donor in loaded else objects[donor])["images"]
                    donors.append({"source_object": object_ids[donor], "source_view": donor_view})
                    donor_sources.append(donor_images[donor_view].expand(len(views), -1, -1, -1))
                # The same rays and seeds as the model's own pass: only the source view differs.
                other_generated = generate(pipe, torch.cat(donor_sources), torch.cat(rays), seeds, **sampling)
                other_generated = other_generated.split(sizes)

            for position, (index, obj, views, images) in enumerate(
                zip(batch_indices, batch, views_of, generated)
            ):
                targets = obj["images"][views]
                predictions = {}
                if "copy_source" in baselines:
                    predictions["copy_source"] = obj["images"][source_views[index]].expand_as(targets)
                if "mean_image" in baselines:
                    predictions["mean_image"] = mean_image.expand_as(targets)
                if "other_source" in baselines:
                    predictions["other_source"] = other_generated[position]
                record = {
                    "object_id": obj["object_id"],
                    "category": obj["category"],
                    "source_view": source_views[index],
                    "target_views": views,
                    **scores(images, targets),
                    "baselines": {name: scores(guess, targets) for name, guess in predictions.items()},
                }
                if "other_source" in baselines:
                    other = record["baselines"]["other_source"]
                    record["baselines"]["other_source"] = {**donors[position], **other}
                # The image first: a record in the file always has its generated views beside it.
                save_view_strip(images, generated_views_path(out_dir, obj["object_id"]))
                handle.write(json.dumps(record) + "\n")
                handle.flush()
            bar.update(len(batch))

    records = read_nvs_records(records_path)
    return [records[object_ids[index]] for index in selected]


def _summary(records: Sequence[dict], category_names: dict[str, str]) -> dict:
    table = aggregate(records, NVS_METRICS)
    view_counts = {len(record["psnr"]) for record in records}
    return {
        **{name: table[name] for name in NVS_METRICS},
        "objects": table["num_objects"],
        "views_per_object": view_counts.pop() if len(view_counts) == 1 else sorted(view_counts),
        "per_category": {
            category: {
                "name": category_names.get(category, category),
                "objects": row["num_objects"],
                **{name: row[name] for name in NVS_METRICS},
            }
            for category, row in table["per_category"].items()
        },
    }


def summarize_nvs(records: Sequence[dict], category_names: dict[str, str] | None = None) -> dict:
    """Averages of NVS records, per object then over objects, overall and per category, for the model
    and for each baseline of the records (:data:`NVS_METRICS`; LPIPS None when skipped)::

        {"psnr", "ssim", "ssim_pixelnerf", "lpips", "fg_iou", "fg_color_error", "objects", "views_per_object",
         "per_category": {synset: {"name", "objects", "psnr", ...}},
         "baselines": {name: {"psnr", ..., "objects", "views_per_object", "per_category"}}}
    """
    category_names = category_names or {}
    baseline_sets = {tuple(record.get("baselines", {})) for record in records}
    if len(baseline_sets) > 1:
        raise ValueError(f"NVS records scored against different baselines: {sorted(baseline_sets)}")
    baselines = baseline_sets.pop() if baseline_sets else ()
    summary = _summary(records, category_names)
    summary["baselines"] = {}
    for name in baselines:
        rows = [{key: r[key] for key in ("object_id", "category")} | r["baselines"][name] for r in records]
        summary["baselines"][name] = _summary(rows, category_names)
    return summary


# --------------------------------------------------------------------------------------- FID


@torch.no_grad()
def evaluate_fid(metric, objects, records: Sequence[dict], out_dir: str | os.PathLike) -> dict:
    """FID between the real and the generated target views of ``records`` (from :func:`run_nvs`,
    whose generated views are read back from ``out_dir``), with ``metric`` from :func:`metrics.fid_metric`."""
    index_of = {object_id: index for index, object_id in enumerate(objects.object_ids)}

    def real_views() -> Iterable[torch.Tensor]:
        for record in records:
            images = objects[index_of[record["object_id"]]]["images"][record["target_views"]]
            yield to_uint8((images + 1) / 2)

    def generated_views() -> Iterable[torch.Tensor]:
        for record in records:
            path = generated_views_path(out_dir, record["object_id"])
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the generated views of {record['object_id']} are missing")
            yield load_view_strip(path, len(record["target_views"]))

    num_images = sum(len(record["target_views"]) for record in records)
    return {"fid": fid(metric, real_views(), generated_views()), "skipped": None, "images": num_images}


# --------------------------------------------------------------------------------------- probes


@torch.no_grad()
def probe_features(
    pipes: Sequence, objects, indices: Sequence[int], seed: int, batch_size: int = 64, progress: bool = True
) -> list[torch.Tensor]:
    """Latents ``pipe.encode(view)`` ``(len(indices), latent_dim)`` of one view per object (the seeded
    :func:`seeded_view`), for each pipeline of ``pipes`` (each object is read once for all of them)."""
    features = [[] for _ in pipes]
    for start in tqdm(range(0, len(indices), batch_size), desc="probe features", disable=not progress):
        items = [objects[index] for index in indices[start : start + batch_size]]
        views = torch.stack([obj["images"][seeded_view(seed, obj["object_id"])] for obj in items])
        for pipe, chunks in zip(pipes, features):
            chunks.append(pipe.encode(views).float().cpu())
    return [torch.cat(chunks) for chunks in features]


def random_encoder_pipeline(pipe, seed: int = 0):
    """``pipe`` with its encoder replaced by a randomly initialised one of the same architecture
    (``torch.manual_seed(seed)``, without touching the global random state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = type(pipe.encoder).from_config(pipe.encoder.config)
    # Cast only when needed: .to(dtype) makes Diffusers warn about its fp32-kept modules even for fp32.
    if encoder.dtype != pipe.encoder.dtype:
        encoder = encoder.to(dtype=pipe.encoder.dtype)
    encoder = encoder.to(pipe.device).eval()
    return type(pipe)(**{**pipe.components, "encoder": encoder})


def evaluate_probe(pipe, train_objects, test_objects, *, seed: int = 0, limit: int | None = None,
                   progress: bool = True) -> dict:
    """Linear and kNN probes (:mod:`soda_diffusers.probe`) of the category from frozen latents of one view
    per object, trained on ``train_objects`` and scored on ``test_objects`` (``limit`` objects of each
    at most), for ``pipe``'s encoder and a randomly initialised one (:func:`random_encoder_pipeline`)::

        {"linear_acc", "knn_acc", "random_encoder": {"linear_acc", "knn_acc"},
         "train_objects", "test_objects", "feature_dim", "categories"}
    """
    if list(train_objects.categories) != list(test_objects.categories):
        raise ValueError("probe: the train and test objects must cover the same categories")
    train_indices, test_indices = select_objects(train_objects, limit), select_objects(test_objects, limit)
    train_labels = [train_objects.labels[i] for i in train_indices]
    test_labels = [test_objects.labels[i] for i in test_indices]
    pipes = [pipe, random_encoder_pipeline(pipe, seed)]
    train_features = probe_features(pipes, train_objects, train_indices, seed, progress=progress)
    test_features = probe_features(pipes, test_objects, test_indices, seed, progress=progress)
    scores = [
        {
            "linear_acc": linear_probe(train, train_labels, test, test_labels),
            "knn_acc": knn_probe(train, train_labels, test, test_labels),
        }
        for train, test in zip(train_features, test_features)
    ]
    return {
        **scores[0],
        "random_encoder": scores[1],
        "train_objects": len(train_indices),
        "test_objects": len(test_indices),
        "feature_dim": int(train_features[0].shape[1]),
        "categories": list(train_objects.category_names),
    }


# --------------------------------------------------------------------------------------- all together


def load_lpips() -> tuple[nn.Module | None, str | None]:
    """``(LPIPS-VGG from local weights, None)``, or ``(None, why not)`` when the weights are missing."""
    try:
        return LPIPS.from_pretrained(), None
    except MissingWeightsError as error:
        return None, str(error)


def evaluate(
    pipe,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    types: Iterable[str] = ("nvs",),
    *,
    limit: int | None = None,
    view_list: str | os.PathLike | None = None,
    split: str = "test",
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    batch_objects: int = 4,
    lpips_model: nn.Module | None = None,
    fid_extractor: nn.Module | None = None,
    generate: GenerateFn = generate_views_per_seed,
    baselines: Sequence[str] = BASELINES,
    progress: bool = True,
) -> dict:
    """Run the evaluations ``types`` (of :data:`EVALUATION_TYPES`) of ``pipe`` on the NMR-format ``data``
    and write ``metrics.json``, ``metrics.md`` and plots to ``out_dir`` (:func:`write_results`).

    ``split``: the objects of NVS and FID, ``"test"`` to report, ``"val"`` to tune on. ``view_list``: a
    pixelNeRF view list fixing each object's source view; None uses the one stored with the data
    (``source_views.txt``, written with the synthetic data), else :func:`seeded_view`.

    ``baselines``: those of :data:`BASELINES` to score beside the model (:func:`run_nvs`; all by default,
    ``other_source`` doubles the sampling), reported under ``results["nvs"]["baselines"][name]``.

    ``lpips_model`` / ``fid_extractor``: None loads LPIPS-VGG / the FID Inception from local weights; when
    those are missing LPIPS is reported as None and FID as skipped, with the reason, and the rest runs.
    Returns the contents of ``metrics.json``: keys ``nvs``, ``probe``, ``fid`` as run.
    """
    types = list(dict.fromkeys(types))
    unknown = [name for name in types if name not in EVALUATION_TYPES]
    if unknown or not types:
        raise ValueError(f"types: expected some of {EVALUATION_TYPES}, got {types}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = pipe.unet.config.sample_size
    results = {}

    fid_skipped = None
    metric = None
    if "fid" in types:
        try:
            metric = fid_metric(fid_extractor)
        except MissingWeightsError as error:
            fid_skipped = str(error)
            print(f"FID skipped: {fid_skipped}")
            results["fid"] = {"fid": None, "skipped": fid_skipped, "images": 0}

    if "nvs" in types or metric is not None:
        test_objects = NMRObjects(data, split=split, image_size=size, store=True,
                                  view_list=view_list if view_list is not None else "stored")
        lpips_skipped = None
        if lpips_model is None:
            lpips_model, lpips_skipped = load_lpips()
            if lpips_model is not None:
                lpips_model = lpips_model.to(pipe.device)
            else:
                print(f"LPIPS skipped: {lpips_skipped}")
        records = run_nvs(
            pipe,
            test_objects,
            out_dir,
            limit=limit,
            seed=seed,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            batch_objects=batch_objects,
            lpips_model=lpips_model,
            generate=generate,
            baselines=baselines,
            progress=progress,
        )
        if "nvs" in types:
            names = dict(zip(test_objects.categories, test_objects.category_names))
            results["nvs"] = {
                **summarize_nvs(records, names),
                "split": split,
                "lpips_skipped": lpips_skipped,
                "settings": {
                    **json.loads((out_dir / NVS_SETTINGS_FILE).read_text()),
                    "ssim_window": SSIM_WINDOW,
                    "ssim_pixelnerf_window": SSIM_PIXELNERF_WINDOW,
                    "foreground": FOREGROUND,
                },
            }
        if metric is not None:
            results["fid"] = evaluate_fid(metric, test_objects, records, out_dir)

    if "probe" in types:
        train_objects = NMRObjects(data, split="train", image_size=size, store=True)
        probe_test = NMRObjects(data, split="test", image_size=size, store=True)
        results["probe"] = evaluate_probe(pipe, train_objects, probe_test, seed=seed, limit=limit, progress=progress)

    write_results(out_dir, results)
    return results


# --------------------------------------------------------------------------------------- reports


def format_number(value, digits: int) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


# The columns of the NVS tables: (key, title, decimals).
NVS_COLUMNS = (
    ("psnr", "PSNR (dB)", 2),
    ("ssim", "SSIM", 3),
    ("ssim_pixelnerf", "SSIM (pixelNeRF)", 3),
    ("lpips", "LPIPS", 3),
    ("fg_iou", "FG IoU", 3),
    ("fg_color_error", "FG colour error", 1),
    ("fg_brightness_error", "its brightness part", 1),
    ("fg_chroma_error", "its chroma part", 1),
    ("light_grey_ratio", "light grey (x targets')", 2),
)


def metric_titles(columns: Sequence[tuple[str, str, int]] = NVS_COLUMNS) -> str:
    return " | ".join(title for _, title, _ in columns)


def metric_cells(row: dict, columns: Sequence[tuple[str, str, int]] = NVS_COLUMNS) -> str:
    """A table row's cells for ``columns`` (:data:`NVS_COLUMNS` or some of them) of averaged scores."""
    values = {**row, "light_grey_ratio": light_grey_ratio(row)}
    return " | ".join(format_number(values.get(key), digits) for key, _, digits in columns)


def _category_label(synset: str, row: dict) -> str:
    return f"{row['name']} ({synset})" if row["name"] != synset else synset


def _baseline_lines(nvs: dict) -> list[str]:
    """The model beside its baselines: every metric overall, then PSNR and FG IoU per category."""
    methods = {"**SODA**": nvs, **{BASELINE_TITLES.get(n, n): b for n, b in nvs["baselines"].items()}}
    titles = metric_titles()
    lines = [
        "### Against baselines",
        "",
        "The same targets scored the same way, predicted by "
        + "; ".join(BASELINE_DESCRIPTIONS.get(name, name) for name in nvs["baselines"])
        + ". Higher is better for PSNR, SSIM and FG IoU, lower for LPIPS and FG colour error.",
        "",
        f"| prediction | {titles} |",
        "|---|" + "---:|" * len(NVS_COLUMNS),
        *(f"| {method} | {metric_cells(row)} |" for method, row in methods.items()),
        "",
        "PSNR (dB) / FG IoU per category:",
        "",
        "| category | " + " | ".join(methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]

    def cells(rows) -> str:
        return " | ".join(f"{format_number(row['psnr'], 2)} / {format_number(row.get('fg_iou'), 3)}" for row in rows)

    lines.append(f"| **all** | {cells(methods.values())} |")
    for synset, row in nvs["per_category"].items():
        lines.append(f"| {_category_label(synset, row)} | "
                     f"{cells(method['per_category'][synset] for method in methods.values())} |")
    return lines


def metrics_markdown(results: dict) -> str:
    """The results of :func:`evaluate` as a Markdown report: overall and per-category tables, the NVS
    metrics of the model and of its baselines."""
    lines = ["# SODA evaluation", ""]
    if "nvs" in results:
        nvs = results["nvs"]
        settings = nvs.get("settings", {})
        titles = metric_titles()
        lines += [
            "## Novel view synthesis",
            "",
            f"{nvs['objects']} {nvs.get('split', 'test')} objects, one source view each ({settings.get('source_views', '?')}), "
            f"the {nvs['views_per_object']} other views as targets; {settings.get('scheduler', '?')}, "
            f"{settings.get('num_inference_steps', '?')} steps, guidance {settings.get('guidance_scale', '?')}. "
            f"PSNR and SSIM on images in [0, 1] (SSIM window: {SSIM_WINDOW}; SSIM (pixelNeRF): "
            f"{SSIM_PIXELNERF_WINDOW}), LPIPS (VGG) on [-1, 1]; FG IoU: IoU of the object silhouettes "
            f"(foreground: {FOREGROUND}; 1 when neither view has any); FG colour error: distance "
            "between the mean foreground colours in 0-255 RGB (a view without foreground counts with the "
            "mean colour of the whole view); averaged per object, then over objects.",
            "",
            f"| category | objects | {titles} |",
            "|---|---:|" + "---:|" * len(NVS_COLUMNS),
            f"| **all** | {nvs['objects']} | {metric_cells(nvs)} |",
        ]
        for synset, row in nvs["per_category"].items():
            lines.append(f"| {_category_label(synset, row)} | {row['objects']} | {metric_cells(row)} |")
        if nvs.get("lpips_skipped"):
            lines += ["", f"LPIPS skipped: {nvs['lpips_skipped']}"]
        lines.append("")
        if nvs.get("baselines"):
            lines += [*_baseline_lines(nvs), ""]
    if "fid" in results:
        fid_result = results["fid"]
        lines += ["## FID", ""]
        if fid_result["fid"] is None:
            lines.append(f"Skipped: {fid_result['skipped']}")
        else:
            lines.append(
                f"FID {fid_result['fid']:.2f} between {fid_result['images']} generated and as many real target views."
            )
        lines.append("")
    if "probe" in results:
        probe = results["probe"]
        lines += [
            "## Probes of the encoder",
            "",
            f"Category of {probe['test_objects']} test objects from the latent of one view, probes trained on "
            f"{probe['train_objects']} train objects ({len(probe['categories'])} categories, "
            f"{probe['feature_dim']}-d latents).",
            "",
            "| encoder | linear probe | kNN probe |",
            "|---|---:|---:|",
            f"| trained | {format_number(probe['linear_acc'], 3)} | {format_number(probe['knn_acc'], 3)} |",
            f"| random init | {format_number(probe['random_encoder']['linear_acc'], 3)} | "
            f"{format_number(probe['random_encoder']['knn_acc'], 3)} |",
            "",
        ]
    return "\n".join(lines)


def write_results(out_dir: str | os.PathLike, results: dict) -> list[Path]:
    """Write ``metrics.json``, ``metrics.md`` and a PNG bar chart per metric (NVS metrics per category,
    the model beside its baselines, probe accuracies) to ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "metrics.json", out_dir / "metrics.md"]
    written[0].write_text(json.dumps(results, indent=2) + "\n")
    written[1].write_text(metrics_markdown(results))
    if "nvs" in results:
        nvs = results["nvs"]
        for name, title in (
            ("psnr", "PSNR (dB)"),
            ("ssim", "SSIM"),
            ("ssim_pixelnerf", "SSIM (pixelNeRF)"),
            ("lpips", "LPIPS (VGG)"),
            ("fg_iou", "Foreground IoU"),
            ("fg_color_error", "Foreground colour error (0-255)"),
        ):
            if nvs.get(name) is None:
                continue
            values = {"all": nvs[name], **{row["name"]: row[name] for row in nvs["per_category"].values()}}
            written.append(plot_bars(values, out_dir / f"nvs_{name}.png", title=f"{title} per category"))
        if nvs.get("baselines"):
            for name, title in (("psnr", "PSNR (dB)"), ("fg_iou", "Foreground IoU")):
                values = {"SODA": nvs[name], **{n: row[name] for n, row in nvs["baselines"].items()}}
                path = out_dir / f"nvs_baselines_{name}.png"
                written.append(plot_bars(values, path, title=f"{title}: SODA and its baselines"))
    if "probe" in results:
        probe = results["probe"]
        values = {
            "linear": probe["linear_acc"],
            "kNN": probe["knn_acc"],
            "linear (random enc.)": probe["random_encoder"]["linear_acc"],
            "kNN (random enc.)": probe["random_encoder"]["knn_acc"],
        }
        written.append(plot_bars(values, out_dir / "probe.png", title="Category probe accuracy (test split)"))
    return written
