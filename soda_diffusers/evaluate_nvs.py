"""Evaluation of a SODA pipeline on NMR-format data: novel view synthesis, FID, and probes of the encoder.

* **nvs**, the single-view protocol of pixelNeRF: every object of the test split (or ``limit`` of them),
  one source view per object (from a pixelNeRF view list such as ``src_dvr.txt``, else
  :func:`~soda_diffusers.evaluation.seeded_view`), the 23 other views as targets. PSNR and SSIM on
  images in [0, 1] (SSIM: Gaussian 11x11 window, sigma 1.5, valid region: see :func:`metrics.ssim`),
  LPIPS (VGG) on [-1, 1] when its weights are on this machine; averaged per object over its 23 views,
  then over objects, overall and per category (:func:`metrics.aggregate`).
* **fid**: FID between the generated and the real target views of the same objects and views.
* **probe**: linear and kNN classification of the category from frozen encoder latents of one view
  per object, trained on the train split and scored on the test split, beside the same probes on a
  randomly initialised encoder of the same architecture.

The NVS pass generates several objects' targets in one pipeline call and is resumable: each object's
scores are appended as one JSON line to ``nvs_objects.jsonl`` (its generated views saved first, as a
PNG strip under ``generated/``), and a rerun skips the objects already there. Each target's starting
noise depends only on ``(seed, object, view)`` (:func:`~soda_diffusers.evaluation.view_seeds`), so the
batch size and where a run was interrupted do not change what is generated.
"""

from __future__ import annotations

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

from soda_diffusers.data import NMRObjects
from soda_diffusers.evaluation import (
    generate_views_per_seed,
    object_target_rays,
    seeded_view,
    target_views,
    view_scores,
    view_seeds,
)
from soda_diffusers.metrics import LPIPS, MissingWeightsError, aggregate, fid, fid_metric, to_uint8
from soda_diffusers.probe import knn_probe, linear_probe
from soda_diffusers.visualize import make_grid, plot_bars

EVALUATION_TYPES = ("nvs", "probe", "fid")
NVS_RECORDS_FILE = "nvs_objects.jsonl"
NVS_SETTINGS_FILE = "nvs_settings.json"
GENERATED_DIR = "generated"
SSIM_WINDOW = "Gaussian 11x11, sigma 1.5, valid region"


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


def nvs_settings(pipe, objects, seed: int, num_inference_steps: int, guidance_scale: float, lpips_model) -> dict:
    """What an NVS record depends on besides the object: a resumed run must match it."""
    return {
        "pipeline": _pipeline_name(pipe),
        "scheduler": type(pipe.scheduler).__name__,
        "num_inference_steps": int(num_inference_steps),
        "guidance_scale": float(guidance_scale),
        "seed": int(seed),
        "image_size": int(objects.image_size),
        "source_views": "from a view list" if objects.source_views is not None else f"seeded, seed {int(seed)}",
        "lpips": None if lpips_model is None else type(lpips_model).__name__,
    }


GenerateFn = Callable[..., torch.Tensor]


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
    progress: bool = True,
) -> list[dict]:
    """Generate and score the target views of the objects of ``objects`` (an ``NMRObjects``, at the
    pipeline's resolution; with a ``view_list`` its source views are used), resuming a previous run in
    ``out_dir``. Returns the records of the selected objects (:func:`select_objects`), in dataset order::

        {"object_id", "category", "source_view", "target_views": [23 views],
         "psnr": [per target view], "ssim": [...], "lpips": [...] or None}

    ``batch_objects`` objects (23 targets each, each with its own source image) go through one
    pipeline call. ``lpips_model``: an LPIPS module (e.g. ``LPIPS.from_pretrained()``), or None to skip
    LPIPS. ``generate(pipe, source_images, target_rays, seeds, num_inference_steps=..., guidance_scale=...)``
    returns the generated views in [-1, 1] (default: :func:`generate_views_per_seed`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = pipe.unet.config.sample_size
    if objects.image_size != size:
        raise ValueError(f"objects: images are {objects.image_size} px, the pipeline generates {size} px")
    if batch_objects < 1:
        raise ValueError(f"batch_objects: expected at least 1, got {batch_objects}")
    _check_settings(out_dir, nvs_settings(pipe, objects, seed, num_inference_steps, guidance_scale, lpips_model))
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
                sources.append(obj["images"][source_view].expand(len(views), -1, -1, -1))
                rays.append(object_target_rays(obj, source_view, size))
                seeds += view_seeds(seed, obj["object_id"], views)
            generated = generate(
                pipe,
                torch.cat(sources),
                torch.cat(rays),
                seeds,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            )
            chunks = generated.split([len(views) for views in views_of])
            for index, obj, views, images in zip(batch_indices, batch, views_of, chunks):
                targets = obj["images"][views]
                record = {
                    "object_id": obj["object_id"],
                    "category": obj["category"],
                    "source_view": source_views[index],
                    "target_views": views,
                    **view_scores(images, targets),
                    "lpips": None,
                }
                if lpips_model is not None:
                    record["lpips"] = lpips_model(images.to(lpips_device), targets.to(lpips_device)).tolist()
                # The image first: a record in the file always has its generated views beside it.
                save_view_strip(images, generated_views_path(out_dir, obj["object_id"]))
                handle.write(json.dumps(record) + "\n")
                handle.flush()
            bar.update(len(batch))

    records = read_nvs_records(records_path)
    return [records[object_ids[index]] for index in selected]


def summarize_nvs(records: Sequence[dict], category_names: dict[str, str] | None = None) -> dict:
    """Averages of NVS records, per object then over objects, overall and per category::

        {"psnr", "ssim", "lpips" (None when skipped), "objects", "views_per_object",
         "per_category": {synset: {"name", "objects", "psnr", "ssim", "lpips"}}}
    """
    table = aggregate(records)
    view_counts = {len(record["psnr"]) for record in records}
    category_names = category_names or {}
    return {
        "psnr": table["psnr"],
        "ssim": table["ssim"],
        "lpips": table["lpips"],
        "objects": table["num_objects"],
        "views_per_object": view_counts.pop() if len(view_counts) == 1 else sorted(view_counts),
        "per_category": {
            category: {
                "name": category_names.get(category, category),
                "objects": row["num_objects"],
                "psnr": row["psnr"],
                "ssim": row["ssim"],
                "lpips": row["lpips"],
            }
            for category, row in table["per_category"].items()
        },
    }


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
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    batch_objects: int = 4,
    lpips_model: nn.Module | None = None,
    fid_extractor: nn.Module | None = None,
    generate: GenerateFn = generate_views_per_seed,
    progress: bool = True,
) -> dict:
    """Run the evaluations ``types`` (of :data:`EVALUATION_TYPES`) of ``pipe`` on the NMR-format ``data``
    and write ``metrics.json``, ``metrics.md`` and plots to ``out_dir`` (:func:`write_results`).

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
        test_objects = NMRObjects(data, split="test", image_size=size, view_list=view_list, store=True)
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
            progress=progress,
        )
        if "nvs" in types:
            names = dict(zip(test_objects.categories, test_objects.category_names))
            results["nvs"] = {
                **summarize_nvs(records, names),
                "lpips_skipped": lpips_skipped,
                "settings": {**json.loads((out_dir / NVS_SETTINGS_FILE).read_text()), "ssim_window": SSIM_WINDOW},
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


def _number(value, digits: int) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def metrics_markdown(results: dict) -> str:
    """The results of :func:`evaluate` as a Markdown report: overall and per-category tables."""
    lines = ["# SODA evaluation", ""]
    if "nvs" in results:
        nvs = results["nvs"]
        settings = nvs.get("settings", {})
        lines += [
            "## Novel view synthesis",
            "",
            f"{nvs['objects']} test objects, one source view each ({settings.get('source_views', '?')}), "
            f"the {nvs['views_per_object']} other views as targets; {settings.get('scheduler', '?')}, "
            f"{settings.get('num_inference_steps', '?')} steps, guidance {settings.get('guidance_scale', '?')}. "
            f"PSNR and SSIM on images in [0, 1] (SSIM window: {SSIM_WINDOW}), LPIPS (VGG) on [-1, 1]; "
            "averaged per object, then over objects.",
            "",
            "| category | objects | PSNR (dB) | SSIM | LPIPS |",
            "|---|---:|---:|---:|---:|",
            f"| **all** | {nvs['objects']} | {_number(nvs['psnr'], 2)} | {_number(nvs['ssim'], 3)} | "
            f"{_number(nvs['lpips'], 3)} |",
        ]
        for synset, row in nvs["per_category"].items():
            label = f"{row['name']} ({synset})" if row["name"] != synset else synset
            lines.append(
                f"| {label} | {row['objects']} | {_number(row['psnr'], 2)} | {_number(row['ssim'], 3)} | "
                f"{_number(row['lpips'], 3)} |"
            )
        if nvs.get("lpips_skipped"):
            lines += ["", f"LPIPS skipped: {nvs['lpips_skipped']}"]
        lines.append("")
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
            f"| trained | {_number(probe['linear_acc'], 3)} | {_number(probe['knn_acc'], 3)} |",
            f"| random init | {_number(probe['random_encoder']['linear_acc'], 3)} | "
            f"{_number(probe['random_encoder']['knn_acc'], 3)} |",
            "",
        ]
    return "\n".join(lines)


def write_results(out_dir: str | os.PathLike, results: dict) -> list[Path]:
    """Write ``metrics.json``, ``metrics.md`` and a PNG bar chart per metric (NVS metrics per category,
    probe accuracies) to ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "metrics.json", out_dir / "metrics.md"]
    written[0].write_text(json.dumps(results, indent=2) + "\n")
    written[1].write_text(metrics_markdown(results))
    if "nvs" in results:
        nvs = results["nvs"]
        for name, title in (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("lpips", "LPIPS (VGG)")):
            if nvs[name] is None:
                continue
            values = {"all": nvs[name], **{row["name"]: row[name] for row in nvs["per_category"].values()}}
            written.append(plot_bars(values, out_dir / f"nvs_{name}.png", title=f"{title} per category"))
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
