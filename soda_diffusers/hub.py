"""Sharing SODA pipelines on the Hugging Face Hub: model cards, the folder to upload, the upload.

:func:`export_for_hub` writes a folder that loads two ways:

* with this package installed, ``SODANovelViewPipeline.from_pretrained(folder_or_repo)`` builds the
  package's own classes (through :func:`package_layout`; none of the bundled code runs);
* without it, ``DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)`` runs the
  bundled source files: the pipeline module at the root and each component's module beside its
  config (Diffusers' "community components" layout)::

    model_index.json            {"_class_name": ["pipeline_soda_novel_view", "SODANovelViewPipeline"],
                                 "encoder": ["soda_encoder", "SODAEncoder"], "unet": [...], "scheduler": [...]}
    pipeline_soda_novel_view.py
    encoder/config.json, encoder/diffusion_pytorch_model.safetensors, encoder/soda_encoder.py
    unet/config.json, unet/diffusion_pytorch_model.safetensors, unet/soda_unet_2d.py
    scheduler/scheduler_config.json
    README.md, metrics.json, train_summary.json, train_config.json, samples/*   (when given)

The bundled files are generated from this package's modules (:func:`standalone_source`): the
``soda_diffusers`` helpers they import (rays, cameras) are inlined, so each file stands alone. It
has to: from a Hub repo, Diffusers downloads only ``<component>/<module>.py`` of a component's code,
not other files beside it that it might import.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import huggingface_hub
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
from huggingface_hub import (
    DatasetCard,
    DatasetCardData,
    ModelCard,
    ModelCardData,
    SpaceCard,
    SpaceCardData,
    create_repo,
    upload_folder,
)
from huggingface_hub import errors as hub_errors
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import soda_diffusers
from soda_diffusers.evaluate_nvs import BASELINE_TITLES
from soda_diffusers.schedules import schedule_name

PACKAGE = "soda_diffusers"
DISTRIBUTION = "soda-diffusers"
PACKAGE_DIR = Path(__file__).resolve().parent
# The templates live in the top-level model_cards/ folder; an installed package reaches them through a
# soda_diffusers/model_cards link, as it does presets/ and training/.
MODEL_CARDS_DIR = next(
    (path for path in (PACKAGE_DIR / "model_cards", PACKAGE_DIR.parent / "model_cards") if path.is_dir()),
    PACKAGE_DIR / "model_cards",
)
PIPELINE_CARD_TEMPLATE = MODEL_CARDS_DIR / "pipeline_card_template.md"
DATASET_CARD_TEMPLATE = MODEL_CARDS_DIR / "dataset_card_template.md"

# Definitions that only work inside the installed package (its preset folder, and the methods that
# call back into it): left out of the bundled source files.
PACKAGE_ONLY_NAMES = ("PRESETS_DIR", "from_preset", "from_pretrained", "push_to_hub")
TRAINING_FILES = ("train_summary.json", "train_config.json")
METRICS_FILE = "metrics.json"
SAMPLES_DIR = "samples"
SAMPLE_SUFFIXES = (".gif", ".png", ".jpg", ".jpeg", ".webp")
TAGS = ["novel-view-synthesis", "representation-learning", "soda"]
# The novel view scores a card shows (metrics.json's "nvs"), with their decimals.
NVS_CARD_COLUMNS = (("psnr", 2), ("ssim", 3), ("ssim_pixelnerf", 3), ("lpips", 3), ("fg_iou", 3), ("fg_color_error", 1))
# The same pattern Diffusers uses to find the imports of a bundled file (check_imports): a docstring
# line that looks like an import counts too.
IMPORT_LINE = re.compile(r"^\s*(?:from\s+(\S+)\s+import|import\s+(\S+)\s*$)", flags=re.MULTILINE)
# Every error huggingface_hub raises for a missing token, a refused request or no network: its
# HTTP errors, LocalTokenNotFoundError and offline mode are OSErrors; transport errors of its HTTP
# client are not.
HUB_ERRORS = (OSError, getattr(hub_errors, "HTTPError", OSError))


class HubUploadError(RuntimeError):
    """The upload to the Hub failed (no token, no access, no network); the exported folder is kept."""

    def __init__(self, repo_id: str, folder: Path, cause: BaseException, repo_type: str = "model"):
        self.repo_id = repo_id
        self.folder = folder
        reason = " ".join(str(cause).split()) or type(cause).__name__
        kind, upload_type = ("repo", "") if repo_type == "model" else (repo_type, f" --repo-type {repo_type}")
        super().__init__(
            f"could not upload to the Hugging Face Hub {kind} {repo_id!r} ({type(cause).__name__}: {reason}). "
            f"The exported folder is kept at {folder}. Log in with `hf auth login` (`huggingface-cli login` "
            "with older huggingface_hub) or set HF_TOKEN to a token with write access, check the network, "
            f"then upload it with `hf upload {repo_id} {folder} .{upload_type}`"
        )


# --------------------------------------------------------------------------------------------------
# Bundled source files


def _module_path(module_name: str) -> Path:
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        raise ValueError(f"{module_name}: no such module")
    return Path(spec.origin)


def _definition_start(node: ast.AST) -> int:
    """First line (1-based) of a definition, its decorators included."""
    return min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])


def _defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [target.id for target in node.targets if isinstance(target, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _drop_package_only(source: str, where: str) -> str:
    """``source`` without the module-level names and class methods of :data:`PACKAGE_ONLY_NAMES`."""
    tree = ast.parse(source)
    dropped = []
    for node in tree.body:
        if set(_defined_names(node)) & set(PACKAGE_ONLY_NAMES):
            dropped.append(node)
        elif isinstance(node, ast.ClassDef):
            dropped += [item for item in node.body if set(_defined_names(item)) & set(PACKAGE_ONLY_NAMES)]
    lines = source.splitlines(keepends=True)
    for node in sorted(dropped, key=_definition_start, reverse=True):
        start, end = _definition_start(node) - 1, node.end_lineno
        # The blank line that separated the definition from the one above goes too.
        if start > 0 and not lines[start - 1].strip():
            start -= 1
        del lines[start:end]
    result = "".join(lines)
    leftover = {
        node.id for node in ast.walk(ast.parse(result)) if isinstance(node, ast.Name) and node.id in PACKAGE_ONLY_NAMES
    }
    if leftover:
        raise ValueError(f"{where}: still uses {sorted(leftover)}, which the bundled files leave out")
    return result


def _split_module(module_name: str) -> dict:
    """A module's docstring, imports, ``soda_diffusers`` dependencies and remaining code."""
    path = _module_path(module_name)
    source = _drop_package_only(path.read_text(encoding="utf-8"), str(path))
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    parts = {"docstring": None, "future": [], "imports": [], "dependencies": [], "names": []}
    body, previous_end = [], 0
    for index, node in enumerate(tree.body):
        # Each statement keeps the comments and blank lines above it.
        text = "".join(lines[previous_end : node.end_lineno])
        previous_end = node.end_lineno
        if index == 0 and ast.get_docstring(tree) is not None:
            parts["docstring"] = text.strip("\n")
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            parts["future"] += [alias.name for alias in node.names]
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise ValueError(f"{path}: relative imports cannot be bundled; import from {PACKAGE}.<module>")
            modules = [node.module] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
            if any(m == PACKAGE or m.startswith(PACKAGE + ".") for m in modules):
                if not isinstance(node, ast.ImportFrom) or node.module == PACKAGE:
                    raise ValueError(
                        f"{path}: bundling needs `from {PACKAGE}.<module> import <names>`, got `{ast.unparse(node)}`"
                    )
                if any(alias.asname for alias in node.names):
                    raise ValueError(f"{path}: renamed imports from {PACKAGE} cannot be bundled: `{ast.unparse(node)}`")
                parts["dependencies"].append(node.module)
                continue
            parts["imports"].append(ast.unparse(node))
            continue
        parts["names"] += _defined_names(node)
        body.append(text)
    parts["body"] = "".join(body).strip("\n")
    return parts


def standalone_source(module_name: str) -> str:
    """The source of the ``soda_diffusers`` module ``module_name`` as one file that does not import
    ``soda_diffusers``: the package modules it imports from are inlined before it (dependencies first),
    and the definitions of :data:`PACKAGE_ONLY_NAMES` are left out."""
    modules: dict[str, dict] = {}  # dependencies first

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise ValueError(f"circular imports: {' -> '.join((*chain, name))}")
        if name in modules:
            return
        parts = _split_module(name)
        for dependency in parts["dependencies"]:
            visit(dependency, (*chain, name))
        modules[name] = parts

    visit(module_name, ())
    owners: dict[str, str] = {}
    for name, parts in modules.items():
        for defined in parts["names"]:
            if defined in owners and owners[defined] != name:
                raise ValueError(f"{defined} is defined in both {owners[defined]} and {name}: they cannot share a file")
            owners[defined] = name

    main = modules[module_name]
    future = sorted({name for parts in modules.values() for name in parts["future"]})
    imports = list(dict.fromkeys(line for parts in modules.values() for line in parts["imports"]))
    inlined = [name for name in modules if name != module_name]
    origin = f"{module_name.replace('.', '/')}.py"
    header = [f"# Generated by soda_diffusers.hub from soda-diffusers {soda_diffusers.__version__}: {origin}"]
    if inlined:
        header.append(f"# with {', '.join(inlined)} inlined, so that this file loads without the package.")
    preamble = ["\n".join(header), main["docstring"], future and f"from __future__ import {', '.join(future)}"]
    sections = ["\n\n".join([*(part for part in preamble if part), "\n".join(imports)])]
    for name in inlined + [module_name]:
        banner = f"# ---- {name} " + "-" * max(4, 96 - len(name)) + "\n\n" if inlined else ""
        sections.append(banner + modules[name]["body"])
    source = "\n\n\n".join(section for section in sections if section) + "\n"
    _check_standalone(source, origin)
    return source


def _check_standalone(source: str, where: str) -> None:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise ValueError(f"{where}: bundled file has a relative import, `{ast.unparse(node)}`")
    for match in IMPORT_LINE.finditer(source):
        module = match.group(1) or match.group(2)
        if module.split(".")[0] == PACKAGE:
            raise ValueError(f"{where}: bundled file still imports {PACKAGE}: `{match.group(0).strip()}`")


def _bundled_module(component_class: type) -> tuple[str, str]:
    """``(file stem, class name)`` of a ``soda_diffusers`` class in the bundled layout."""
    return component_class.__module__.rsplit(".", 1)[-1], component_class.__name__


def write_bundled_sources(pipe: DiffusionPipeline, folder: str | os.PathLike) -> dict:
    """Turn ``folder`` (``pipe.save_pretrained(folder)``) into the layout that loads without the
    package: write the bundled source files and point ``model_index.json`` at them. Returns the new index."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    for name, component in pipe.components.items():
        library = index.get(name, [None])[0]
        if component is None or library is None:
            continue
        if library == PACKAGE or library.startswith(PACKAGE + "."):
            stem, class_name = _bundled_module(type(component))
            (folder / name / f"{stem}.py").write_text(standalone_source(type(component).__module__), encoding="utf-8")
            index[name] = [stem, class_name]
        elif library not in LOADABLE_CLASSES:
            raise ValueError(
                f"component {name!r} is a {type(component).__name__} from {library!r}, which neither Diffusers "
                f"nor {PACKAGE} provides: it could not be loaded from the Hub"
            )
    stem, class_name = _bundled_module(type(pipe))
    if not type(pipe).__module__.startswith(PACKAGE + "."):
        raise ValueError(f"pipeline class {class_name} is not from {PACKAGE}: cannot bundle its source")
    (folder / f"{stem}.py").write_text(standalone_source(type(pipe).__module__), encoding="utf-8")
    index["_class_name"] = [stem, class_name]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return index


# --------------------------------------------------------------------------------------------------
# Loading an exported folder with the package's own classes

DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")


def _package_entry(entry: Sequence[str], where: str) -> list[str]:
    class_name = entry[1]
    package_class = getattr(soda_diffusers, class_name, None)
    if package_class is None:
        raise ValueError(
            f"{where}: bundles a class {class_name} that {PACKAGE} {soda_diffusers.__version__} does not have; "
            "load it with DiffusionPipeline.from_pretrained(..., trust_remote_code=True)"
        )
    return [package_class.__module__, class_name]


@contextlib.contextmanager
def package_layout(pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> Iterator[str]:
    """A path that ``DiffusionPipeline.from_pretrained`` loads with this package's classes.

    A folder or Hub repo written by :func:`export_for_hub` names its bundled source files in
    ``model_index.json``, and Diffusers would run those (asking for ``trust_remote_code``). Here the
    folder is mirrored, with symbolic links, under a ``model_index.json`` that names the package's
    modules instead. Anything else is given back unchanged. ``kwargs`` are the download options of
    ``from_pretrained`` (``revision``, ``token``, ``cache_dir``, ...); others are ignored.
    """
    download_kwargs = {key: kwargs[key] for key in DOWNLOAD_KWARGS if key in kwargs}
    source = Path(pretrained_model_name_or_path)
    if source.is_dir():
        index_path = source / "model_index.json"
    else:
        index_path = Path(huggingface_hub.hf_hub_download(str(pretrained_model_name_or_path), "model_index.json", **download_kwargs))
    index = json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else {}
    if not isinstance(index.get("_class_name"), list):
        yield str(pretrained_model_name_or_path)
        return
    components = [name for name, entry in index.items() if not name.startswith("_") and isinstance(entry, list)]
    if not source.is_dir():
        source = Path(
            huggingface_hub.snapshot_download(
                str(pretrained_model_name_or_path),
                allow_patterns=["model_index.json", *(f"{name}/*" for name in components)],
                ignore_patterns=["*.py"],
                **download_kwargs,
            )
        )
    where = f"{pretrained_model_name_or_path}/model_index.json"
    rewritten = dict(index, _class_name=_package_entry(index["_class_name"], where)[1])
    for name in components:
        library = index[name][0]
        if library is not None and (source / name / f"{library}.py").is_file():
            rewritten[name] = _package_entry(index[name], where)
    with tempfile.TemporaryDirectory(prefix="soda-package-layout-") as mirror:
        for name in components:
            if (source / name).exists():
                _link_or_copy(source / name, Path(mirror) / name)
        (Path(mirror) / "model_index.json").write_text(json.dumps(rewritten, indent=2), encoding="utf-8")
        yield mirror


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        target.symlink_to(source.resolve(), target_is_directory=True)
    except OSError:
        # Some file systems (Windows without developer mode) refuse symbolic links.
        shutil.copytree(source, target)


# --------------------------------------------------------------------------------------------------
# Model card


def _read_json(path: Path | None) -> dict | None:
    if path is None or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _load_metrics(metrics: str | os.PathLike | Mapping | None) -> dict | None:
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
    presets = sorted(p for p in (PACKAGE_DIR / "presets").iterdir() if (p / "model_index.json").is_file())
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
        ("classifier-free guidance", f"`z` dropped with p = {unet.z_drop_prob:g} in training"),
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
    metrics = _load_metrics(metrics)
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
# Export and upload


def new_or_empty_folder(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as a Path, or a ValueError when it exists and is not an empty folder."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"out_dir: {out_dir} exists and is not an empty folder; give a new or empty one")
    return out_dir


def load_pipeline(pipe_or_dir: DiffusionPipeline | str | os.PathLike) -> DiffusionPipeline:
    """``pipe_or_dir`` itself, or the pipeline saved there (a clear error when it is no pipeline folder)."""
    if isinstance(pipe_or_dir, DiffusionPipeline):
        return pipe_or_dir
    if not (Path(pipe_or_dir) / "model_index.json").is_file():
        raise FileNotFoundError(f"pipeline: no model_index.json in {pipe_or_dir} (a save_pretrained folder)")
    return soda_diffusers.SODANovelViewPipeline.from_pretrained(pipe_or_dir)


def export_for_hub(
    pipe_or_dir: DiffusionPipeline | str | os.PathLike,
    out_dir: str | os.PathLike,
    metrics: str | os.PathLike | Mapping | None = None,
    samples: Sequence[str | os.PathLike] | None = None,
    *,
    training_dir: str | os.PathLike | None = None,
    repo_id: str | None = None,
    dataset: str | None = None,
) -> Path:
    """Write exactly the folder to upload (see the module docstring) to ``out_dir``, new or empty.

    Args:
        pipe_or_dir: a pipeline, or a folder it was saved (or exported) to; a folder is also the
            default ``training_dir``.
        metrics: a ``metrics.json`` path or dict; by default ``training_dir/metrics.json`` if present.
        samples: image files to show in the card, copied to ``samples/``; by default those of
            ``training_dir/samples`` (:func:`find_samples`).
        training_dir: a training output folder (``train_summary.json``, ``train_config.json``).
        repo_id: the Hub repo the card's usage snippets load.
        dataset: a Hub dataset id of the training data, for the card's metadata.
    """
    out_dir = new_or_empty_folder(out_dir)
    pipe = load_pipeline(pipe_or_dir)
    if not isinstance(pipe_or_dir, DiffusionPipeline):
        training_dir = training_dir or pipe_or_dir
    if training_dir is not None:
        training_dir = Path(training_dir)
        if metrics is None and (training_dir / METRICS_FILE).is_file():
            metrics = training_dir / METRICS_FILE
        if samples is None:
            samples = find_samples(training_dir)
    metrics = _load_metrics(metrics)
    samples = [Path(sample) for sample in samples or []]
    for sample in samples:
        if not sample.is_file():
            raise FileNotFoundError(f"samples: no file {sample}")
    duplicates = [name for name, count in Counter(s.name for s in samples).items() if count > 1]
    if duplicates:
        raise ValueError(f"samples: several files named {duplicates}; they would overwrite each other in {SAMPLES_DIR}/")

    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    write_bundled_sources(pipe, out_dir)
    if metrics is not None:
        (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    for name in TRAINING_FILES:
        if training_dir is not None and (training_dir / name).is_file():
            shutil.copy2(training_dir / name, out_dir / name)
    if samples:
        (out_dir / SAMPLES_DIR).mkdir()
        for sample in samples:
            shutil.copy2(sample, out_dir / SAMPLES_DIR / sample.name)
    card = render_model_card(
        pipe,
        metrics=metrics,
        training_dir=out_dir,
        samples=[f"{SAMPLES_DIR}/{sample.name}" for sample in samples],
        repo_id=repo_id,
        dataset=dataset,
    )
    card.save(out_dir / "README.md")
    return out_dir


def push_to_hub(
    pipe_or_dir: DiffusionPipeline | str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    **export_kwargs,
):
    """Export ``pipe_or_dir`` (:func:`export_for_hub`) to a temporary folder and upload it to the
    model repo ``repo_id``, created if needed. The upload is one commit that adds or replaces the
    exported files and deletes nothing else in the repo. Returns huggingface_hub's ``CommitInfo``.

    Raises :class:`HubUploadError` when the Hub cannot be reached or refuses (no token, no write
    access); the exported folder is then kept, for a later ``hf upload``.
    """
    folder = Path(tempfile.mkdtemp(prefix="soda-hub-export-"))

    def export(resolved_repo_id: str) -> None:
        try:
            export_for_hub(pipe_or_dir, folder, repo_id=resolved_repo_id, **export_kwargs)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    try:
        # create_repo completes a bare name with the user's namespace: the card should show the full id.
        resolved = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    except HUB_ERRORS as error:
        export(repo_id)
        raise HubUploadError(repo_id, folder, error) from error
    export(resolved)
    try:
        commit = upload_folder(
            repo_id=resolved,
            folder_path=folder,
            commit_message=commit_message or f"Upload SODA pipeline (soda-diffusers {soda_diffusers.__version__})",
            token=token,
            create_pr=create_pr,
        )
    except HUB_ERRORS as error:
        raise HubUploadError(resolved, folder, error) from error
    shutil.rmtree(folder, ignore_errors=True)
    return commit


# --------------------------------------------------------------------------------------------------
# Space: the demo, served from a model repo

SPACE_APP_MODULE = "soda_diffusers.space_app"
SPACE_FILES = ("app.py", "README.md", "requirements.txt")


def space_app_source(model_id: str) -> str:
    """The Space's ``app.py``: :mod:`soda_diffusers.space_app` standalone (the demo inlined), serving ``model_id``."""
    source, count = re.subn(r"^MODEL_ID = None$", f"MODEL_ID = {model_id!r}", standalone_source(SPACE_APP_MODULE),
                            flags=re.MULTILINE)
    if count != 1:
        raise ValueError(f"{SPACE_APP_MODULE}: expected one `MODEL_ID = None` line to set, found {count}")
    return source


def _imported_distributions(sources: Sequence[str]) -> set[str]:
    """The (canonical) names of the installed distributions that ``sources`` import, the standard library aside."""
    modules = set()
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                modules.add(node.module.split(".")[0])
    modules -= {*sys.stdlib_module_names, "__future__"}
    owners = importlib.metadata.packages_distributions()
    unknown = sorted(module for module in modules if module not in owners)
    if unknown:
        raise ValueError(f"the Space's code imports {unknown}, which no installed distribution provides")
    return {canonicalize_name(owners[module][0]) for module in modules}


def space_requirements(sources: Sequence[str]) -> list[str]:
    """The Space's ``requirements.txt`` lines: every distribution ``sources`` import, with the version bounds
    this package (and its ``demo`` extra) puts on it. Gradio is left out: the Space's ``sdk_version`` installs it."""
    bounds = {}
    for text in importlib.metadata.requires(DISTRIBUTION) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": "demo"}):
            bounds[canonicalize_name(requirement.name)] = f"{requirement.name}{requirement.specifier}"
    return sorted(bounds.get(name, name) for name in _imported_distributions(sources) - {"gradio"})


def render_space_card(model_id: str, space_id: str | None = None) -> SpaceCard:
    """The Space's ``README.md``: its metadata (Gradio SDK pinned to the installed Gradio, ``app.py``, the model
    repo it serves) and how to run the same app elsewhere."""
    try:
        gradio_version = importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError('the Space pins the Gradio installed here, and there is none: pip install -e ".[demo]"') from None
    title = f"SODA novel views: {model_id.split('/')[-1]}"
    card_data = SpaceCardData(
        title=title, emoji="🧊", colorFrom="indigo", colorTo="gray", sdk="gradio", sdk_version=gradio_version,
        app_file="app.py", models=[model_id], license="apache-2.0", tags=TAGS,
    )
    body = f"""
# {title}

The interactive demo of [{model_id}](https://huggingface.co/{model_id}), a SODA bottleneck diffusion model for
novel view synthesis: upload one picture of an object on a white background, turn the camera with the sliders,
press Generate for one view or Orbit for 24 views around it. Transparent images are put on white and
non-square ones padded to square, as the training images were.

`app.py` is the `soda-nvs demo` app of soda-diffusers {soda_diffusers.__version__}, written standalone; the
pipeline's code comes from the model repo (`trust_remote_code=True`). To run it elsewhere:

```bash
pip install -r requirements.txt gradio=={gradio_version}
python app.py                                   # serves {model_id}
SODA_PIPELINE=path/to/pipeline python app.py    # or another pipeline: a Hub id or a saved folder
```
"""
    return SpaceCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def export_space(
    pipe_or_dir: DiffusionPipeline | str | os.PathLike, out_dir: str | os.PathLike, model_id: str
) -> Path:
    """Write the Space folder that serves the demo of the model repo ``model_id`` (where ``pipe_or_dir`` is,
    or will be, pushed) to ``out_dir``, new or empty: ``app.py``, ``requirements.txt`` (what ``app.py`` and
    the pipeline's bundled code import) and ``README.md`` (the Space's metadata)."""
    out_dir = new_or_empty_folder(out_dir)
    pipe = load_pipeline(pipe_or_dir)
    app = space_app_source(model_id)
    bundled = {type(pipe).__module__} | {
        type(component).__module__ for component in pipe.components.values()
        if component is not None and type(component).__module__.startswith(PACKAGE + ".")
    }
    requirements = space_requirements([app, *(standalone_source(module) for module in sorted(bundled))])
    card = render_space_card(model_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "app.py").write_text(app, encoding="utf-8")
    (out_dir / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
    card.save(out_dir / "README.md")
    return out_dir


def push_space(
    pipe_or_dir: DiffusionPipeline | str | os.PathLike,
    space_id: str,
    model_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
):
    """Create (if needed) the Gradio Space ``space_id`` and upload :func:`export_space`'s folder to it, serving
    the model repo ``model_id``: one commit that deletes nothing. Returns huggingface_hub's ``CommitInfo``;
    raises :class:`HubUploadError`, keeping the folder, when the Hub cannot be reached or refuses."""
    folder = Path(tempfile.mkdtemp(prefix="soda-space-export-"))
    try:
        export_space(pipe_or_dir, folder, model_id)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        resolved = create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, token=token,
                               exist_ok=True).repo_id
        commit = upload_folder(
            repo_id=resolved, repo_type="space", folder_path=folder, token=token,
            commit_message=commit_message or f"Demo of {model_id} (soda-diffusers {soda_diffusers.__version__})",
        )
    except HUB_ERRORS as error:
        raise HubUploadError(space_id, folder, error, repo_type="space") from error
    shutil.rmtree(folder, ignore_errors=True)
    return commit


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
