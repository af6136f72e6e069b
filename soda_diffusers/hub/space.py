"""A Gradio Space serving the demo (``soda-nvs demo``) of a pipeline on the Hub: its folder and its upload.

The Space's folder::

    app.py              APP_TEMPLATE with the model repo filled in
    soda_demo/          space_app.py and the package's modules it imports (relatively), on and on, copied from this
                        package as they are, in their folders (cameras.py imports models/modeling_soda.py)
    requirements.txt    what all that code and the model's bundled code import, with this package's bounds
    README.md           the Space's metadata (Gradio SDK pinned to the installed Gradio)

The pipeline's own code comes from the model repo (``trust_remote_code``), so the Space never installs this package.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from diffusers import DiffusionPipeline
from huggingface_hub import SpaceCard, SpaceCardData
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import soda_diffusers
from soda_diffusers.hub.bundle import bundled_sources, imported_modules
from soda_diffusers.hub.cards import TAGS
from soda_diffusers.hub.export import HUB_ERRORS, HubUploadError, load_pipeline, new_or_empty_folder

DISTRIBUTION = "soda-diffusers"
SPACE_PACKAGE = "soda_demo"
SPACE_ENTRY_MODULE = "space_app"
SPACE_FILES = ("app.py", "README.md", "requirements.txt", SPACE_PACKAGE)
APP_TEMPLATE = '''\
"""The soda-nvs demo serving the SODA pipeline MODEL_ID (soda-diffusers {version}); SODA_PIPELINE overrides it."""

import sys
from pathlib import Path

# soda_demo/ sits beside this file, however it is started (python app.py, or runpy).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from {package}.{entry} import main  # noqa: E402

MODEL_ID = {model_id!r}

if __name__ == "__main__":
    main(MODEL_ID)
'''
# Diffusers' pattern for the relative imports of a file (get_relative_imports).
RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\S+)\s+import", flags=re.MULTILINE)


def space_app_source(model_id: str) -> str:
    """The Space's ``app.py``: :func:`soda_diffusers.space_app.main` serving ``model_id``."""
    return APP_TEMPLATE.format(version=soda_diffusers.__version__, package=SPACE_PACKAGE, entry=SPACE_ENTRY_MODULE,
                               model_id=model_id)


def space_modules() -> dict[str, Path]:
    """The package's files that go into the Space's ``soda_demo/``, by name: the entry module and what it
    imports relatively, on and on. Anything they import absolutely must not be this package."""
    files, pending = {}, [SPACE_ENTRY_MODULE]
    while pending:
        name = pending.pop()
        if name in files:
            continue
        path = Path(soda_diffusers.__file__).parent / f"{name.replace('.', '/')}.py"
        source = path.read_text(encoding="utf-8")
        if "soda_diffusers" in imported_modules(source):
            raise ValueError(f"{path}: imports soda_diffusers, which the Space does not have; import it relatively")
        files[name] = path
        package = name.rpartition(".")[0]  # where a relative import starts from
        pending += [f"{package}.{found}" if package else found for found in RELATIVE_IMPORT.findall(source)]
    return files


def _imported_distributions(sources: Sequence[str]) -> set[str]:
    """The (canonical) names of the installed distributions that ``sources`` import, the standard library
    and the Space's own package aside."""
    modules = set().union(*(imported_modules(source) for source in sources))
    modules -= {*sys.stdlib_module_names, "__future__", SPACE_PACKAGE}
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

`{SPACE_PACKAGE}/` holds the `soda-nvs demo` code of soda-diffusers {soda_diffusers.__version__}, as it is;
`app.py` serves {model_id} with it. The pipeline's code comes from the model repo (`trust_remote_code=True`).
To run it elsewhere:

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
    """Write the Space folder (see the module docstring) that serves the demo of the model repo ``model_id``
    (where ``pipe_or_dir`` is, or will be, pushed) to ``out_dir``, new or empty."""
    out_dir = new_or_empty_folder(out_dir)
    pipe = load_pipeline(pipe_or_dir)
    app = space_app_source(model_id)
    modules = space_modules()
    sources = [app, *(path.read_text(encoding="utf-8") for path in modules.values()), *bundled_sources(pipe).values()]
    requirements = space_requirements(sources)
    card = render_space_card(model_id)
    (out_dir / SPACE_PACKAGE).mkdir(parents=True)
    for name, path in modules.items():
        target = out_dir / SPACE_PACKAGE / f"{name.replace('.', '/')}.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
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
    raises :class:`~soda_diffusers.hub.export.HubUploadError`, keeping the folder, when the Hub cannot be
    reached or refuses."""
    client = soda_diffusers.hub  # as in export.push_to_hub: the one place to swap the Hub client
    folder = Path(tempfile.mkdtemp(prefix="soda-space-export-"))
    try:
        export_space(pipe_or_dir, folder, model_id)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        resolved = client.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, token=token,
                                      exist_ok=True).repo_id
        commit = client.upload_folder(
            repo_id=resolved, repo_type="space", folder_path=folder, token=token,
            commit_message=commit_message or f"Demo of {model_id} (soda-diffusers {soda_diffusers.__version__})",
        )
    except HUB_ERRORS as error:
        raise HubUploadError(space_id, folder, error, repo_type="space") from error
    shutil.rmtree(folder, ignore_errors=True)
    return commit
