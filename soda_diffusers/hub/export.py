"""A pipeline's Hub model repo: the folder to upload, its upload, and loading it back with this package.

:func:`export_for_hub` writes a folder that loads two ways:

* with this package installed, ``SODANovelViewPipeline.from_pretrained(folder_or_repo)`` builds the
  package's own classes (through :func:`package_layout`; none of the bundled code runs);
* without it, ``DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)`` runs the
  bundled source files, copies of the package's (:mod:`soda_diffusers.hub.bundle`): the pipeline module at
  the root and each component's module beside its config (Diffusers' "community components" layout)::

    model_index.json            {"_class_name": ["pipeline_soda_novel_view", "SODANovelViewPipeline"],
                                 "encoder": ["modeling_soda", "SODAEncoder"], "unet": [...], "scheduler": [...]}
    pipeline_soda_novel_view.py
    encoder/config.json, encoder/diffusion_pytorch_model.safetensors, encoder/modeling_soda.py
    unet/config.json, unet/diffusion_pytorch_model.safetensors, unet/modeling_soda.py
    scheduler/scheduler_config.json
    README.md, metrics.json, train_summary.json, train_config.json, samples/*   (when given)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import huggingface_hub
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
from huggingface_hub import errors as hub_errors

import soda_diffusers
from soda_diffusers.hub.bundle import PACKAGE, bundled_module, write_bundled_sources
from soda_diffusers.hub.cards import (
    METRICS_FILE,
    SAMPLES_DIR,
    TRAINING_FILES,
    find_samples,
    load_metrics,
    render_model_card,
)

# Every error huggingface_hub raises for a missing token, a refused request or no network: its
# HTTP errors, LocalTokenNotFoundError and offline mode are OSErrors; transport errors of its HTTP
# client are not.
HUB_ERRORS = (OSError, getattr(hub_errors, "HTTPError", OSError))
DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")


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


def _point_index_at_bundled_sources(pipe: DiffusionPipeline, folder: Path) -> None:
    """``model_index.json`` of ``folder`` naming the bundled modules instead of the package."""
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    for name, component in pipe.components.items():
        library = index.get(name, [None])[0]
        if component is not None and library is not None and (library == PACKAGE or library.startswith(PACKAGE + ".")):
            index[name] = list(bundled_module(type(component)))
    index["_class_name"] = list(bundled_module(type(pipe)))
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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
            ``training_dir/samples`` (:func:`~soda_diffusers.hub.cards.find_samples`).
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
    metrics = load_metrics(metrics)
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
    _point_index_at_bundled_sources(pipe, out_dir)
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
    # The Hub client is called as soda_diffusers.hub holds it: the one place to swap it (the tests do).
    client = soda_diffusers.hub
    folder = Path(tempfile.mkdtemp(prefix="soda-hub-export-"))

    def export(resolved_repo_id: str) -> None:
        try:
            export_for_hub(pipe_or_dir, folder, repo_id=resolved_repo_id, **export_kwargs)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    try:
        # create_repo completes a bare name with the user's namespace: the card should show the full id.
        resolved = client.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    except HUB_ERRORS as error:
        export(repo_id)
        raise HubUploadError(repo_id, folder, error) from error
    export(resolved)
    try:
        commit = client.upload_folder(
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
# Loading an exported folder with the package's own classes


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
        # A bundled module's name (modeling_soda; soda_encoder, soda_unet_2d in older exports) rather than a
        # library's: checked by name, as a Hub repo's download above leaves the code out.
        if library is not None and library not in LOADABLE_CLASSES and library.split(".")[0] != PACKAGE:
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
