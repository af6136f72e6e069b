"""The cards of what is shared on the Hub: a pipeline's model card and an NMR dataset's card.

Both are rendered from the Jinja templates in the top-level ``model_cards/`` folder, from what a run leaves
behind: the pipeline's configs, ``metrics.json``, ``train_summary.json``, ``train_config.json`` and
``samples/`` for a model; the splits, categories and features of an Arrow directory for a dataset.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from diffusers import DiffusionPipeline
from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

import soda_diffusers
from soda_diffusers.evaluation.runner import BASELINE_TITLES
from soda_diffusers.resources import resource_dir
from soda_diffusers.schedules import schedule_name

MODEL_CARDS_DIR = resource_dir("model_cards")
PIPELINE_CARD_TEMPLATE = MODEL_CARDS_DIR / "pipeline_card_template.md"
DATASET_CARD_TEMPLATE = MODEL_CARDS_DIR / "dataset_card_template.md"
# What a training run leaves beside the pipeline, and the card shows.
TRAINING_FILES = ("train_summary.json", "train_config.json")
METRICS_FILE = "metrics.json"
SAMPLES_DIR = "samples"
SAMPLE_SUFFIXES = (".gif", ".png", ".jpg", ".jpeg", ".webp")
TAGS = ["novel-view-synthesis", "representation-learning", "soda"]
# The novel view scores a card shows (metrics.json's "nvs"), with their decimals.
NVS_CARD_COLUMNS = (("psnr", 2), ("ssim", 3), ("ssim_pixelnerf", 3), ("lpips", 3), ("fg_iou", 3), ("fg_color_error", 1))


# --------------------------------------------------------------------------------------------------
# Model card


def _read_json(path: Path | None) -> dict | None:
    if path is None or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def load_metrics(metrics: str | os.PathLike | Mapping | None) -> dict | None:
    """A ``metrics.json`` path or its dict as a dict (``None`` stays ``None``)."""
    if metrics is None or isinstance(metrics, Mapping):
        return None if metrics is None else dict(metrics)
    if not Path(metrics).is_file():
        raise FileNotFoundError(f"metrics: no file {metrics}")
    loaded = json.loads(Path(metrics).read_text(encoding="utf-8"))
    if not isinstance(loaded, dict):
        raise ValueError(f"metrics: {metrics} holds a {type(loaded).__name__}, expected a JSON object")
    return loaded


def find_samples(folder: str | os.PathLike) -> list[Path]:
    """Sample images in ``folder/samples``: every orbit GIF and picture, but of the grids training
    writes at each validation (``step-<n>.png``) only the last, which shows the final model."""
    samples_dir = Path(folder) / SAMPLES_DIR
    if not samples_dir.is_dir():
        return []
    files = sorted(p for p in samples_dir.iterdir() if p.is_file() and p.suffix.lower() in SAMPLE_SUFFIXES)
    step_grids = sorted((p for p in files if re.fullmatch(r"step-\d+", p.stem)), key=lambda p: int(p.stem[5:]))
    return [p for p in files if p not in step_grids] + step_grids[-1:]


def _sample_caption(name: str) -> str:
    stem = Path(name).stem
    match = re.fullmatch(r"step-(\d+)", stem)
    if match:
        return f"held-out objects after {int(match.group(1)):,} training steps (rows: source view, true target view, generated view)"
    return stem.replace("_", " ").replace("-", " ")


def _normalised_config(config: Mapping) -> dict:
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def _same_config(model, config_path: Path) -> bool:
    if not config_path.is_file():
        return False
    # Preset files list only what differs from the class defaults.
    defaults = {
        key: parameter.default
        for key, parameter in inspect.signature(type(model).__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    preset_config = {**defaults, **json.loads(config_path.read_text(encoding="utf-8"))}
    return _normalised_config(preset_config) == _normalised_config(model.config)


def preset_name(pipe: DiffusionPipeline) -> str | None:
    """The preset whose encoder and U-Net configs the pipeline's match, if any."""
    presets = sorted(p for p in resource_dir("presets").iterdir() if (p / "model_index.json").is_file())
    for preset in presets:
        if all(_same_config(getattr(pipe, name), preset / name / "config.json") for name in ("encoder", "unet")):
            return preset.name
    return None


def _count(number: int) -> str:
    return f"{number:,} ({number / 1e6:.2f} M)"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{int(seconds // 3600)} h {round(seconds % 3600 / 60):02d} min"


def _number(value, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _ray_encoding(config: Mapping) -> str:
    if config["ray_encoding"] == "plucker":
        return (
            f"Plücker coordinates `[d, o x d]` and {config['ray_fourier_features']} random Fourier features "
            f"(scale {config['ray_fourier_scale']:g})"
        )
    return f"NeRF sinusoidal encoding of origin and direction, {config['ray_sinusoidal_bands']} bands"


def _architecture_rows(pipe: DiffusionPipeline) -> list[tuple[str, str]]:
    encoder, unet, scheduler = pipe.encoder.config, pipe.unet.config, pipe.scheduler.config
    preset = preset_name(pipe)
    attention = ", ".join(f"{r}x{r}" for r in unet.attention_resolutions)
    return [
        ("preset", f"`{preset}`" if preset else "custom (no preset of soda-diffusers matches)"),
        ("encoder", f"ResNet, widths {list(encoder.block_out_channels)}, {encoder.layers_per_block} residual "
                    f"block(s) per stage, {_count(pipe.encoder.num_parameters())} parameters"),
        ("U-Net", f"AdaGN U-Net, widths {list(unet.block_out_channels)}, {unet.layers_per_block} residual "
                  f"block(s) per level, {f'self-attention at {attention}' if attention else 'no attention'}, "
                  f"{_count(pipe.unet.num_parameters())} parameters"),
        ("latent `z`", f"{encoder.latent_dim} numbers"
                       + (", split across the U-Net levels (layer-wise modulation)" if unet.layerwise_modulation else "")),
        ("image size", f"source {encoder.sample_size} px, generated views {unet.sample_size} px"
                       + (f" (U-Net on {unet.patch_size}x{unet.patch_size} patches)" if unet.patch_size > 1 else "")),
        ("noise schedule", f"`{schedule_name(scheduler)}`, {scheduler['num_train_timesteps']} training steps, "
                           f"sampled with `{type(pipe.scheduler).__name__}`"),
        ("prediction type", f"`{scheduler['prediction_type']}`"),
        ("ray encoding", _ray_encoding(unet)),
    ]


def _dataset_tags(data: str | None, dataset: str | None) -> list[str]:
    if dataset:
        return [dataset.split("/")[-1].lower()]
    if data is None:
        return []
    return ["synthetic-nmr"] if "synthetic" in Path(data).name.lower() else ["nmr", "shapenet"]


def _training_rows(summary: dict | None, config: dict | None) -> list[tuple[str, str]]:
    if summary is None and config is None:
        return []
    summary, config = summary or {}, config or {}
    rows = []
    data = summary.get("data", config.get("data"))
    if data:
        rows.append(("data", f"`{Path(str(data)).name}`" + (f", categories {config['categories']}" if config.get("categories") else "")))
    if "train_steps" in summary:
        planned = config.get("max_train_steps")
        steps = f"{summary['train_steps']:,}" + (f" (of {planned:,} planned)" if planned and planned != summary["train_steps"] else "")
        rows.append(("steps", steps))
    batch = summary.get("batch_size", config.get("train_batch_size"))
    if batch:
        processes = summary.get("processes", 1)
        rows.append(("batch size", f"{batch}" + (f" per process x {processes} processes" if processes > 1 else "")))
    if "learning_rate" in config:
        encoder_lr = config.get("encoder_learning_rate") or config["learning_rate"]
        rows.append(("learning rate", f"U-Net {config['learning_rate']:g}, encoder {encoder_lr:g}, "
                                      f"`{config.get('lr_scheduler', 'constant')}` schedule, "
                                      f"{config.get('lr_warmup_steps', 0)} warm-up steps, AdamW"))
    if "z_drop_prob" in config:
        rows.append(("classifier-free guidance", f"`z` dropped with p = {config['z_drop_prob']:g} in training"
                     + (f", each level's chunk with p = {config['layer_mask_prob']:g}" if config.get("layer_mask_prob") else "")))
    if "use_ema" in config:
        rows.append(("EMA", f"decay {config['ema_decay']:g} (the card's weights)" if config["use_ema"] else "no"))
    if config.get("mixed_precision"):
        rows.append(("precision", {"no": "fp32"}.get(config["mixed_precision"], str(config["mixed_precision"]))))
    if summary.get("hardware"):
        rows.append(("hardware", str(summary["hardware"])))
    elif "processes" in summary:
        rows.append(("processes", str(summary["processes"])))
    if "train_seconds" in summary:
        rows.append(("training time", _duration(float(summary["train_seconds"]))))
    if "matmul_tflops_start" in summary:
        rows.append(("machine speed", f"dense {summary['matmul_dtype']} matmul {summary['matmul_tflops_start']:.2f} "
                                      f"TFLOP/s at the start, {summary['matmul_tflops_end']:.2f} at the end"))
    overrides = {k: config[k] for k in ("encoder", "unet") if config.get(k)}
    if config.get("preset"):
        rows.append(("started from", f"preset `{config['preset']}`" + (f" with {json.dumps(overrides)}" if overrides else "")))
    if "seed" in config:
        rows.append(("seed", str(config["seed"])))
    return rows


def _metric_rows(metrics: dict | None) -> dict:
    """The evaluation tables: novel views (overall and per category), probes, FID."""
    if not metrics:
        return {}
    tables = {}
    nvs = metrics.get("nvs")
    if nvs:
        def scores(values):
            return [_number(values.get(name), digits) for name, digits in NVS_CARD_COLUMNS]

        def row(name, values):
            return [name, _number(values.get("num_objects", values.get("objects")), 0), *scores(values)]

        categories = (nvs.get("per_category") or {}).items()
        tables["nvs"] = [row("all", nvs)] + [
            row(f"{values['name']} ({name})" if values.get("name") else name, values) for name, values in categories
        ]
        baselines = (nvs.get("baselines") or {}).items()
        if baselines:
            tables["nvs_baselines"] = [["SODA", *scores(nvs)]] + [
                [BASELINE_TITLES.get(name, name), *scores(values)] for name, values in baselines
            ]
    probe = metrics.get("probe")
    if probe:
        tables["probe"] = [[name.replace("_", " "), _number(value, 3)] for name, value in probe.items()
                           if isinstance(value, (int, float)) and not isinstance(value, bool)]
    if metrics.get("fid") is not None:
        fid = metrics["fid"]
        items = fid.items() if isinstance(fid, Mapping) else [("FID", fid)]
        tables["fid"] = [[name, _number(value, 2)] for name, value in items]
    notes = {k: v for k, v in metrics.items() if k not in ("nvs", "probe", "fid") and isinstance(v, (str, int, float))}
    if notes:
        tables["notes"] = [[k.replace("_", " "), _number(v, 3)] for k, v in notes.items()]
    return tables


def render_model_card(
    pipe_or_dir: DiffusionPipeline | str | os.PathLike,
    *,
    metrics: str | os.PathLike | Mapping | None = None,
    training_dir: str | os.PathLike | None = None,
    samples: Sequence[str] | None = None,
    repo_id: str | None = None,
    dataset: str | None = None,
    template_path: str | os.PathLike = PIPELINE_CARD_TEMPLATE,
) -> ModelCard:
    """The model card (``README.md``) of a pipeline, from ``model_cards/pipeline_card_template.md``.

    Args:
        pipe_or_dir: a pipeline, or a saved or exported pipeline folder; a folder is also where
            ``metrics.json``, the training files and ``samples/`` are looked for by default.
        metrics: a ``metrics.json`` path or its dict (``nvs``, ``probe``, ``fid``).
        training_dir: the folder holding ``train_summary.json`` and ``train_config.json``.
        samples: image paths as the card links them (relative to the card).
        repo_id: the Hub repo the usage snippets load.
        dataset: a Hub dataset id of the training data, for the card's metadata.
    """
    if not Path(template_path).is_file():
        raise FileNotFoundError(f"model card template: no file {template_path}")
    folder = None if isinstance(pipe_or_dir, DiffusionPipeline) else Path(pipe_or_dir)
    pipe = pipe_or_dir if folder is None else soda_diffusers.SODANovelViewPipeline.from_pretrained(folder)
    if folder is not None:
        training_dir = training_dir or folder
        metrics = metrics if metrics is not None else (folder / METRICS_FILE if (folder / METRICS_FILE).is_file() else None)
        samples = samples if samples is not None else [p.relative_to(folder).as_posix() for p in find_samples(folder)]
    metrics = load_metrics(metrics)
    summary = _read_json(Path(training_dir) / TRAINING_FILES[0]) if training_dir else None
    config = _read_json(Path(training_dir) / TRAINING_FILES[1]) if training_dir else None
    data = (summary or {}).get("data", (config or {}).get("data"))
    model_id = repo_id or (folder.name if folder is not None else "soda-novel-view")
    card_data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=[*TAGS, f"diffusers:{type(pipe).__name__}", *_dataset_tags(data, dataset)],
        datasets=[dataset] if dataset else None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_id=model_id,
        model_name=model_id.split("/")[-1],
        architecture=_architecture_rows(pipe),
        training=_training_rows(summary, config),
        metrics=_metric_rows(metrics),
        samples=[(sample, _sample_caption(sample)) for sample in samples or []],
        package_version=soda_diffusers.__version__,
    )


# --------------------------------------------------------------------------------------------------
# Dataset card


def _size_category(rows: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]
    return next((name for bound, name in bounds if rows < bound), "1M<n<10M")


def render_dataset_card(
    arrow_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    source: str | None = None,
    template_path: str | os.PathLike = DATASET_CARD_TEMPLATE,
) -> DatasetCard:
    """The dataset card of an NMR Arrow directory written by ``soda_diffusers.data.convert_to_arrow``
    (from ``model_cards/dataset_card_template.md``): splits, object counts per category, stored image
    size, columns and camera conventions. ``source`` says where the data was converted from."""
    import datasets

    if not Path(template_path).is_file():
        raise FileNotFoundError(f"dataset card template: no file {template_path}")
    if not (Path(arrow_dir) / "dataset_dict.json").is_file():
        raise FileNotFoundError(f"{arrow_dir}: not an Arrow directory written by convert_to_arrow (no dataset_dict.json)")
    dataset_dict = datasets.load_from_disk(str(arrow_dir))
    splits = [(split, dataset.num_rows) for split, dataset in dataset_dict.items()]
    per_category: dict[str, Counter] = {}
    for split, dataset in dataset_dict.items():
        for synset, name in zip(dataset["category"], dataset["category_name"]):
            per_category.setdefault(f"{name} ({synset})", Counter())[split] += 1
    features = next(iter(dataset_dict.values())).features
    total = sum(rows for _, rows in splits)
    card_data = DatasetCardData(
        license="other",
        license_name="shapenet-terms-of-use",
        license_link="https://shapenet.org/terms",
        pretty_name="NMR (ShapeNet renders), Arrow",
        size_categories=[_size_category(total)],
        task_categories=["image-to-image"],
        tags=["novel-view-synthesis", "nmr", "shapenet", "multi-view", "soda"],
    )
    return DatasetCard.from_template(
        card_data,
        template_path=str(template_path),
        dataset_id=repo_id or Path(arrow_dir).name,
        source=source,
        image_size=features["images"].shape[1],
        splits=splits,
        per_category=[(name, [counts[split] for split, _ in splits]) for name, counts in sorted(per_category.items())],
        total=total,
        with_masks="masks" in features,
        package_version=soda_diffusers.__version__,
    )
