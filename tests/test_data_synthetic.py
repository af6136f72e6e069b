"""The built-in synthetic NMR dataset: layout, determinism and geometry (cameras, masks, rays agree)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import yaml

from soda_diffusers.cameras import CAMERA_KEYS, NMR_NUM_VIEWS, nmr_cameras
from soda_diffusers.cli import main
from soda_diffusers.data import (
    NMR_CATEGORIES,
    NMRDataset,
    NMRObjects,
    default_synthetic_dataset,
    make_synthetic_nmr,
    synthetic_objects,
)
from soda_diffusers.data import synthetic as synthetic_module
from soda_diffusers.data.raytrace import ray_distances
from soda_diffusers.data.synthetic import split_sizes

SEED = 0


@pytest.fixture(scope="session")
def all_categories(tmp_path_factory) -> Path:
    """3 objects of each of the 13 categories: one per split."""
    return make_synthetic_nmr(tmp_path_factory.mktemp("synthetic") / "nmr", 3, seed=SEED)


@pytest.fixture(scope="session")
def shapes():
    return {f"{o.category}/{o.object_id}": o for o in synthetic_objects(3, seed=SEED)}


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout(all_categories):
    metadata = yaml.safe_load((all_categories / "metadata.yaml").read_text())
    assert metadata == {synset: {"id": synset, "name": name} for synset, name in NMR_CATEGORIES.items()}
    for synset in NMR_CATEGORIES:
        ids = {
            split: (all_categories / synset / f"softras_{split}.lst").read_text().split()
            for split in ("train", "val", "test")
        }
        assert [len(v) for v in ids.values()] == [1, 1, 1]
        for object_id in sum(ids.values(), []):
            folder = all_categories / synset / object_id
            assert len(object_id) == 32
            for view in range(NMR_NUM_VIEWS):
                with PIL.Image.open(folder / "image" / f"{view:04d}.png") as image:
                    assert image.mode == "RGB" and image.size == (64, 64)
                    pixels = np.asarray(image)
                with PIL.Image.open(folder / "mask" / f"{view:04d}.png") as mask:
                    assert mask.size == (64, 64)
                    mask = np.asarray(mask)
                # White background wherever the mask is empty, an object in the middle.
                assert (pixels[mask == 0] == 255).all() and mask[32 - 8 : 32 + 8, 32 - 8 : 32 + 8].any()
            cameras = np.load(folder / "cameras.npz")
            expected = nmr_cameras()
            assert sorted(cameras.files) == sorted(expected)
            for key in expected:
                np.testing.assert_array_equal(cameras[key], expected[key])
    assert split_sizes(1) == {"train": 1, "val": 0, "test": 0}
    assert split_sizes(3) == {"train": 1, "val": 1, "test": 1}
    assert split_sizes(10) == {"train": 8, "val": 1, "test": 1}
    assert split_sizes(30) == {"train": 24, "val": 3, "test": 3}


def test_generation_is_deterministic(all_categories, tmp_path):
    subset = make_synthetic_nmr(tmp_path / "subset", 3, seed=SEED, categories=["car", "03636649"])
    files = read_tree(subset)
    full = read_tree(all_categories)
    # Same seed, same bytes; choosing fewer categories changes none of the objects of the others.
    index_files = ("metadata.yaml", "source_views.txt")
    assert {name: data for name, data in files.items() if name not in index_files} == {
        name: data for name, data in full.items() if name.split("/")[0] in ("02958343", "03636649")
    }
    # The held-out objects' source views too: the subset's lines are the full list's lines of its categories.
    subset_views = files["source_views.txt"].decode().splitlines()
    full_views = full["source_views.txt"].decode().splitlines()
    assert subset_views and subset_views == [line for line in full_views if line.split()[0] in ("02958343", "03636649")]
    archive = make_synthetic_nmr(
        tmp_path / "subset", 3, seed=SEED, categories=["lamp", "car"], zip=True, num_workers=2
    )
    assert archive.name == "subset.zip"
    with zipfile.ZipFile(archive) as opened:
        members = {n[len("NMR_Dataset/") :]: opened.read(n) for n in opened.namelist() if not n.endswith("/")}
    assert members == files
    again = make_synthetic_nmr(tmp_path / "again", 3, seed=SEED, categories=["lamp", "car"], zip=True)
    assert again.read_bytes() == archive.read_bytes()
    other = make_synthetic_nmr(tmp_path / "other", 3, seed=SEED + 1, categories=["car"])
    assert set(read_tree(other)).isdisjoint(name for name in files if "/" in name and name.endswith(".png"))


def test_shapes_fit_the_unit_sphere(shapes):
    for item in shapes.values():
        assert item.shape.bounding_radius() <= 0.5 + 1e-9
        assert item.shape.contains(item.shape.anchor_point()).all()
        assert not item.shape.contains(np.array([[0.0, 0.0, 0.6]])).any()


def test_anchor_point_projects_into_the_mask(all_categories, shapes):
    objects = NMRObjects(all_categories, split="train", image_size=64, with_masks=True)
    for index in range(len(objects)):
        item = objects[index]
        anchor = np.append(shapes[item["object_id"]].shape.anchor_point(), 1.0)
        for view in range(NMR_NUM_VIEWS):
            cameras = item["cameras"]
            p = cameras[f"camera_mat_{view}"] @ cameras[f"world_mat_{view}"] @ anchor
            x, y = p[0] / p[2], p[1] / p[2]
            j, i = round((x + 1) / 2 * 63), round((y + 1) / 2 * 63)
            assert item["masks"][view, 0, i, j] > 0, (item["object_id"], view)


def rays_in_world(item, source_world_mat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The item's target rays, from the source camera's frame back to the world."""
    rays = item["target_rays"].double().numpy().reshape(6, -1).T
    to_world = np.linalg.inv(source_world_mat)
    return rays[:, :3] @ to_world[:3, :3].T + to_world[:3, 3], rays[:, 3:] @ to_world[:3, :3].T


def test_loader_rays_hit_the_object_where_the_mask_says(all_categories, shapes):
    dataset = NMRDataset(all_categories, split="val", image_size=64, seed=11)
    objects = NMRObjects(all_categories, split="val", image_size=64, with_masks=True)
    agree = total = 0
    for idx in range(5, len(dataset), 24):
        item = dataset[idx]
        whole = objects[idx // 24]
        shape = shapes[item["object_id"]].shape
        origins, directions = rays_in_world(item, whole["cameras"][f"world_mat_{item['source_view']}"])
        mask = whole["masks"][item["target_view"], 0].numpy().reshape(-1)
        # Every ray through the object passes within its bounding sphere; the corners' rays do not.
        distance_to_centre = np.linalg.norm(np.cross(-origins, directions), axis=1)
        assert (distance_to_centre[mask > 0] <= 0.5 + 1e-4).all()
        corners = [0, 63, 64 * 63, 64 * 64 - 1]
        assert (mask[corners] == 0).all() and (distance_to_centre[corners] > 0.5).all()
        # Pixel-centre rays hit where the mask is full and miss where it is empty.
        hit = np.isfinite(ray_distances(shape.primitives, origins, directions))
        decided = (mask == 1) | (mask == 0)
        agree += (hit[decided] == (mask[decided] == 1)).sum()
        total += decided.sum()
    assert agree / total > 0.999, agree / total


def test_loader_rays_project_back_onto_their_pixel_centres(all_categories):
    """A point on the ray of pixel (i, j) projects, through the cameras the images were rendered
    with, onto that pixel's centre ``linspace(-1, 1, W)[j], linspace(-1, 1, H)[i]``."""
    for size in (64, 32):
        dataset = NMRDataset(all_categories, split="test", image_size=size, seed=2)
        objects = NMRObjects(all_categories, split="test", image_size=size)
        for idx in (3, 100, 250):
            item, cameras = dataset[idx], objects[idx // 24]["cameras"]
            origins, directions = rays_in_world(item, cameras[f"world_mat_{item['source_view']}"])
            points = np.concatenate([origins + 2.5 * directions, np.ones((len(origins), 1))], axis=1)
            view = item["target_view"]
            projected = points @ (cameras[f"camera_mat_{view}"] @ cameras[f"world_mat_{view}"]).T
            y, x = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
            np.testing.assert_allclose(projected[:, 0] / projected[:, 2], x.ravel(), atol=1e-5)
            np.testing.assert_allclose(projected[:, 1] / projected[:, 2], y.ravel(), atol=1e-5)


def test_objects_fill_a_good_part_of_the_frame(all_categories):
    objects = NMRObjects(all_categories, split="test", image_size=64, with_masks=True)
    widths = []
    for index in range(len(objects)):
        columns = (objects[index]["masks"][:, 0] > 0.5).any(dim=1)
        for view in columns:
            covered = torch.nonzero(view)
            widths.append((covered.max() - covered.min() + 1).item() / 64)
    assert 0.3 <= np.mean(widths) <= 0.6, np.mean(widths)
    assert max(widths) < 0.9


def test_views_differ(all_categories):
    objects = NMRObjects(all_categories, split="test", image_size=32)
    for index in range(len(objects)):
        images = objects[index]["images"]
        # Even a lamp, turned a quarter, changes its silhouette or shading in a few % of the frame.
        changed = ((images[0] - images[6]).abs() > 0.02).any(dim=0)
        assert changed.float().mean() > 0.03


def test_default_dataset_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SODA_DIFFUSERS_CACHE", str(tmp_path / "cache"))
    path = default_synthetic_dataset(objects_per_category=1, seed=5)
    assert path.parent == tmp_path / "cache" and path.name.endswith("-1-5")
    assert len(NMRDataset(path, image_size=16)) == 13 * 24
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial output left behind

    def fail(*args, **kwargs):
        raise AssertionError("the cached dataset was rendered again")

    monkeypatch.setattr(synthetic_module, "make_synthetic_nmr", fail)
    assert default_synthetic_dataset(objects_per_category=1, seed=5) == path


def test_make_synthetic_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["make-synthetic", "--out", str(out), "--objects-per-category", "1"]
    assert main(args + ["--categories", "rifle", "--zip"]) == 0
    assert "wrote" in capsys.readouterr().out
    dataset = NMRDataset(tmp_path / "cli.zip", image_size=32)
    assert dataset.categories == ["04090263"] and len(dataset) == 24
    assert main(args + ["--zip"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--categories", "sofas"]) == 2
    assert "did you mean 'sofa'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["cli.zip"]


def test_zip_prefix_and_png_bytes_round_trip(tmp_path):
    archive = make_synthetic_nmr(tmp_path / "NMR_Dataset.zip", 1, categories=["display"], zip=True)
    with zipfile.ZipFile(archive) as opened:
        names = opened.namelist()
        object_id = names[-1].split("/")[2]
        image = np.asarray(
            PIL.Image.open(io.BytesIO(opened.read(f"NMR_Dataset/03211117/{object_id}/image/0003.png")))
        )
    assert names[0] == "NMR_Dataset/" and "NMR_Dataset/metadata.yaml" in names
    item = NMRObjects(archive, split="train", image_size=64)[0]
    decoded = ((item["images"][3] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(decoded, image)
    assert set(item["cameras"]) == {f"{key}_{v}" for v in range(24) for key in CAMERA_KEYS}
