"""The NMR dataset layout: category ids, split names, member paths, category lookup and view lists.

One object of the NMR dataset (ShapeNet renders of Kato et al., packaged by Niemeyer et al.)::

    <root>/metadata.yaml                 {synset: {id: synset, name: name}}
    <root>/<synset>/softras_train.lst    one object id per line (also softras_val, softras_test)
    <root>/<synset>/<object>/image/0000.png ... 0023.png   64 x 64 RGB, white background
    <root>/<synset>/<object>/mask/0000.png ...             channel 0 holds the mask
    <root>/<synset>/<object>/cameras.npz                   world_mat_i, camera_mat_i and inverses
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping, Sequence

from soda_diffusers.cameras import NMR_NUM_VIEWS
from soda_diffusers.data.errors import NMRFormatError

NMR_IMAGE_SIZE = 64
SPLITS = ("train", "val", "test")

# The 13 ShapeNet categories of NMR, synset id -> name.
NMR_CATEGORIES = {
    "02691156": "airplane",
    "02828884": "bench",
    "02933112": "cabinet",
    "02958343": "car",
    "03001627": "chair",
    "03211117": "display",
    "03636649": "lamp",
    "03691459": "loudspeaker",
    "04090263": "rifle",
    "04256520": "sofa",
    "04379243": "table",
    "04401088": "telephone",
    "04530566": "watercraft",
}

METADATA_FILE = "metadata.yaml"
CAMERAS_FILE = "cameras.npz"
# The evaluation's source view of each val and test object, as a pixelNeRF view list (its src_dvr.txt
# for NMR): written with the synthetic data, so every evaluation of it uses the same views.
SOURCE_VIEWS_FILE = "source_views.txt"


def split_file(category: str, split: str) -> str:
    return f"{category}/softras_{split}.lst"


def image_file(category: str, object_id: str, view: int) -> str:
    return f"{category}/{object_id}/image/{view:04d}.png"


def mask_file(category: str, object_id: str, view: int) -> str:
    return f"{category}/{object_id}/mask/{view:04d}.png"


def cameras_file(category: str, object_id: str) -> str:
    return f"{category}/{object_id}/{CAMERAS_FILE}"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
    return split


def category_aliases(name: str) -> list[str]:
    """ShapeNet metadata names can list synonyms ("airplane,aeroplane,plane"): each one matches."""
    return [alias.strip().lower() for alias in str(name).split(",") if alias.strip()]


def resolve_categories(
    requested: Iterable[str] | str | None, available: Mapping[str, str], where: str
) -> list[str]:
    """Sorted synset ids of ``requested`` (synset ids or names, any mix) among ``available``
    (synset id -> name). ``None`` means all of them."""
    if requested is None:
        return sorted(available)
    if isinstance(requested, str):
        requested = [requested]
    by_name = {}
    for synset, name in available.items():
        for alias in category_aliases(name):
            by_name.setdefault(alias, synset)
    resolved = set()
    for category in requested:
        key = str(category).strip()
        if key in available:
            resolved.add(key)
        elif key.lower() in by_name:
            resolved.add(by_name[key.lower()])
        else:
            choices = sorted(available) + sorted(by_name)
            close = difflib.get_close_matches(key.lower(), choices, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
            valid = ", ".join(f"{synset} ({available[synset]})" for synset in sorted(available))
            raise ValueError(f"category {key!r} is not in {where}: {hint}valid categories: {valid}")
    if not resolved:
        raise ValueError(f"categories: expected at least one category of {where}, got an empty list")
    return sorted(resolved)


def read_view_list(path: str | os.PathLike) -> dict[str, int]:
    """A pixelNeRF view list (lines ``category object view``, e.g. ``src_dvr.txt``) as
    ``{"<synset>/<object>": view}``."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"view_list: no such file {path!r} (expected lines 'category object view')"
        ) from None
    except UnicodeDecodeError as error:
        raise NMRFormatError(f"view list {path!r}: not a text file ({error})") from None
    return parse_view_list(text, path)


def parse_view_list(text: str, path: str) -> dict[str, int]:
    """The lines ``category object view`` of a view list (read from ``path``, named in errors)."""
    lines = text.splitlines()
    views = {}
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or not fields[2].isdigit() or int(fields[2]) >= NMR_NUM_VIEWS:
            raise NMRFormatError(
                f"view list {path!r}, line {number}: expected 'category object view' with view in "
                f"0..{NMR_NUM_VIEWS - 1}, got {line.strip()!r}"
            )
        views[f"{fields[0]}/{fields[1]}"] = int(fields[2])
    if not views:
        raise NMRFormatError(f"view list {path!r}: no 'category object view' lines")
    return views


def check_views(views: Sequence[int]) -> list[int]:
    views = [int(v) for v in views]
    bad = [v for v in views if not 0 <= v < NMR_NUM_VIEWS]
    if bad:
        raise ValueError(f"views: expected integers in 0..{NMR_NUM_VIEWS - 1}, got {bad}")
    return views
