"""The source files an exported pipeline ships, so that it loads without this package: the package's own
files, copied byte for byte.

The pipeline module goes to the folder's root and each component's module beside its config. From a Hub
repo, ``DiffusionPipeline.download`` fetches only ``<component>/<module>.py`` of a component's code (its
``allow_patterns``), so a component's module cannot import a sibling file: both models and the helpers
they need share one self-contained module, :mod:`soda_diffusers.models.modeling_soda`, which ships as
``encoder/modeling_soda.py`` and ``unet/modeling_soda.py``. :func:`bundled_files` checks that no shipped
file imports this package or a sibling.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES

PACKAGE = "soda_diffusers"
# Import lines, read as Diffusers reads a bundled file (check_imports): by line, so a docstring line that looks
# like an import counts too. Diffusers' own pattern misses `import numpy as np`; this one does not.
IMPORT_LINE = re.compile(r"^\s*(?:from\s+(\S+)\s+import\b|import\s+([\w.]+))", flags=re.MULTILINE)


def imported_modules(source: str) -> set[str]:
    """The top-level modules ``source`` imports (its import lines); relative imports are left out."""
    names = (match.group(1) or match.group(2) for match in IMPORT_LINE.finditer(source))
    return {name.split(".")[0] for name in names if not name.startswith(".")}


def _check_ships_alone(source: str, where: str) -> None:
    if PACKAGE in imported_modules(source):
        raise ValueError(f"{where}: imports {PACKAGE}, which a folder loaded without the package does not have")
    if any(name.startswith(".") for match in IMPORT_LINE.finditer(source) for name in match.groups() if name):
        raise ValueError(f"{where}: has a relative import, whose file Diffusers would not download from a Hub repo")


def bundled_module(component_class: type) -> tuple[str, str]:
    """``(file stem, class name)`` of a ``soda_diffusers`` class in the exported layout."""
    return component_class.__module__.rsplit(".", 1)[-1], component_class.__name__


def _is_package_class(component_class: type) -> bool:
    return component_class.__module__ == PACKAGE or component_class.__module__.startswith(PACKAGE + ".")


def _source_file(component_class: type) -> Path:
    spec = importlib.util.find_spec(component_class.__module__)
    if spec is None or spec.origin is None:
        raise ValueError(f"{component_class.__module__}: no such module")
    return Path(spec.origin)


def bundled_files(pipe: DiffusionPipeline) -> dict[str, Path]:
    """The package files an export of ``pipe`` ships, by their path in the folder: the pipeline's module
    at the root and each ``soda_diffusers`` component's module in its folder."""
    if not _is_package_class(type(pipe)):
        raise ValueError(f"pipeline class {type(pipe).__name__} is not from {PACKAGE}: cannot bundle its source")
    files = {f"{bundled_module(type(pipe))[0]}.py": _source_file(type(pipe))}
    for name, component in pipe.components.items():
        if component is None:
            continue
        if _is_package_class(type(component)):
            files[f"{name}/{bundled_module(type(component))[0]}.py"] = _source_file(type(component))
        elif type(component).__module__.split(".")[0] not in LOADABLE_CLASSES:
            raise ValueError(
                f"component {name!r} is a {type(component).__name__} from {type(component).__module__!r}, which "
                f"neither Diffusers nor {PACKAGE} provides: it could not be loaded from the Hub"
            )
    for path, source_file in files.items():
        _check_ships_alone(source_file.read_text(encoding="utf-8"), path)
    return files


def bundled_sources(pipe: DiffusionPipeline) -> dict[str, str]:
    """The text of :func:`bundled_files`, by path in the exported folder."""
    return {path: source_file.read_text(encoding="utf-8") for path, source_file in bundled_files(pipe).items()}


def write_bundled_sources(pipe: DiffusionPipeline, folder: str | Path) -> None:
    """Copy :func:`bundled_files` into ``folder``, file to file."""
    for path, source_file in bundled_files(pipe).items():
        shutil.copyfile(source_file, Path(folder) / path)
