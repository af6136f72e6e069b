"""Bad input gives one clear error naming the file or key and what was expected, and a conversion that
fails part-way leaves what was already there."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from soda_diffusers.cli import main
from soda_diffusers.data import (
    NMRDataset,
    NMRFormatError,
    NMRObjects,
    convert_to_arrow,
    make_synthetic_nmr,
    read_view_list,
)
from soda_diffusers.data import synthetic as synthetic_module

CAR = "02958343"


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> Path:
    return make_synthetic_nmr(tmp_path_factory.mktemp("pristine") / "nmr", 3, seed=4, categories=["car"])


@pytest.fixture
def data(pristine, tmp_path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "nmr"))


def first_object(root: Path) -> Path:
    return root / CAR / (root / CAR / "softras_train.lst").read_text().split()[0]


def read_everything(path, split="train"):
    objects = NMRObjects(path, split=split, image_size=32, with_masks=True)
    return [objects[i] for i in range(len(objects))]


def test_missing_cameras(data):
    (first_object(data) / "cameras.npz").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"cameras\.npz: no such file \(expected the object's cameras"
    ):
        read_everything(data)


def test_missing_image_and_mask(data):
    (first_object(data) / "image" / "0003.png").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"image/0003\.png: no such file \(expected one of the object's 24 views"
    ):
        read_everything(data)
    val_object = data / CAR / (data / CAR / "softras_val.lst").read_text().split()[0]
    shutil.rmtree(val_object / "mask")
    with pytest.raises(FileNotFoundError, match=r"mask/0000\.png: no such file"):
        NMRObjects(data, split="val", with_masks=True)[0]


def test_missing_split_file(data):
    (data / CAR / "softras_val.lst").unlink()
    assert len(NMRDataset(data, split="train")) == 24
    with pytest.raises(
        FileNotFoundError, match=r"softras_val\.lst: no such file \(expected the split's list"
    ):
        NMRDataset(data, split="val")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_png(data, damage):
    path = first_object(data) / "image" / "0005.png"
    content = path.read_bytes()
    path.write_bytes(b"not a png at all" if damage == "garbage" else content[: len(content) // 2])
    with pytest.raises(NMRFormatError, match=r"image/0005\.png: not a readable PNG image"):
        read_everything(data)


def test_wrong_image_size(data):
    import PIL.Image

    PIL.Image.new("RGB", (32, 32), "white").save(first_object(data) / "image" / "0001.png")
    with pytest.raises(NMRFormatError, match=r"0001\.png: expected a 64x64 image, got 32x32"):
        read_everything(data)


def test_bad_cameras(data):
    path = first_object(data) / "cameras.npz"
    cameras = dict(np.load(path))
    del cameras["world_mat_7"]
    np.savez(path, **cameras)
    with pytest.raises(NMRFormatError, match=r"cameras\.npz: missing key 'world_mat_7'"):
        read_everything(data)
    path.write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(NMRFormatError, match=r"cameras\.npz: not a readable \.npz file"):
        read_everything(data)


def test_truncated_and_corrupt_zip(pristine, tmp_path):
    archive = make_synthetic_nmr(tmp_path / "nmr.zip", 3, seed=4, categories=["car"], zip=True)
    content = archive.read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(content[: len(content) // 2])
    # (Half an archive of stored .npz files can still look like a zip: that of an .npz.)
    with pytest.raises(NMRFormatError, match=r"truncated\.zip: not an? .*truncated"):
        NMRDataset(truncated)
    truncated.write_bytes(content[:100])
    with pytest.raises(NMRFormatError, match=r"truncated\.zip: not a zip archive, truncated or corrupt\?"):
        NMRDataset(truncated)
    # Damage the data of one PNG member: the central directory is fine, that member is not.
    with zipfile.ZipFile(archive) as opened:
        info = opened.getinfo(f"NMR_Dataset/{CAR}/{first_object(pristine).name}/image/0002.png")
    start = info.header_offset + 30 + len(info.filename) + 40
    damaged = bytearray(content)
    damaged[start : start + 16] = bytes(16)
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(bytes(damaged))
    with pytest.raises(
        NMRFormatError, match=r"corrupt\.zip:NMR_Dataset/02958343/\w+/image/0002\.png: cannot read"
    ):
        read_everything(corrupt)


def test_unknown_category_lists_close_names(pristine):
    with pytest.raises(
        ValueError,
        match=r"category 'cars' is not in .*did you mean 'car'.*valid categories: 02958343 \(car\)",
    ):
        NMRDataset(pristine, categories=["cars"])
    with pytest.raises(ValueError, match="expected at least one category"):
        NMRDataset(pristine, categories=[])


def test_empty_split(data):
    (data / CAR / "softras_test.lst").write_text("\n")
    with pytest.raises(NMRFormatError, match=r"split 'test' has no objects in categories 02958343 \(car\)"):
        NMRObjects(data, split="test")


def test_not_an_nmr_dataset(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"")
    with pytest.raises(NMRFormatError, match=r"not an NMR dataset \(expected metadata\.yaml"):
        NMRDataset(tmp_path / "photos")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        NMRDataset(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NMRFormatError, match="not a zip archive"):
        NMRDataset(tmp_path / "notes.txt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.md", "hello")
    with pytest.raises(NMRFormatError, match=r"not an NMR dataset archive.* among its 1 members"):
        NMRDataset(tmp_path / "other.zip")


def test_bad_metadata_and_arguments(data):
    (data / "metadata.yaml").write_text("02958343: [car\n")
    with pytest.raises(NMRFormatError, match=r"metadata\.yaml: not valid YAML"):
        NMRDataset(data)
    (data / "metadata.yaml").write_text("- car\n")
    with pytest.raises(NMRFormatError, match=r"metadata\.yaml: expected a mapping"):
        NMRDataset(data)
    # Unquoted ids, as YAML 1.1 would read 04256520 as an octal number: still strings here.
    (data / "metadata.yaml").write_text("02958343:\n  id: 02958343\n  name: car,auto,automobile\n")
    dataset = NMRDataset(data, categories=["automobile"])
    assert dataset.categories == [CAR] and dataset.category_names == ["car"]
    for bad in (48, 128, 0):
        with pytest.raises(
            ValueError, match=rf"image_size: .* stores 64 px images; expected a size dividing 64 .* got {bad}"
        ):
            NMRDataset(data, image_size=bad)
    with pytest.raises(ValueError, match="split: expected one of"):
        NMRDataset(data, split="training")
    with pytest.raises(ValueError, match=r"num_source_views: expected 1\.\.23"):
        NMRDataset(data, num_source_views=24)


def test_bad_view_list(tmp_path):
    with pytest.raises(FileNotFoundError, match="view_list: no such file"):
        read_view_list(tmp_path / "missing.txt")
    path = tmp_path / "src_dvr.txt"
    path.write_text("02958343 abc 3\n02958343 def 24\n")
    with pytest.raises(NMRFormatError, match=r"line 2: expected 'category object view' with view in 0\.\.23"):
        read_view_list(path)


def test_failed_conversion_keeps_the_previous_output(pristine, data, tmp_path):
    out = convert_to_arrow(pristine, tmp_path / "arrow")
    before = NMRDataset(out, image_size=16)[10]
    with pytest.raises(FileExistsError, match="already exists"):
        convert_to_arrow(pristine, out)
    (first_object(data) / "image" / "0009.png").write_bytes(b"broken")
    with pytest.raises(NMRFormatError, match=r"0009\.png: not a readable PNG"):
        convert_to_arrow(data, out, overwrite=True)
    after = NMRDataset(out, image_size=16)[10]
    assert all(
        after[k] == before[k] if isinstance(before[k], (int, str)) else after[k].equal(before[k])
        for k in before
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrow", "nmr"]  # no partial output left
    # The CLI reports the same error on one line, with status 2.
    assert main(["convert", "--src", str(data), "--out", str(tmp_path / "again")]) == 2
    assert not (tmp_path / "again").exists()


def test_failed_generation_keeps_the_previous_output(tmp_path, monkeypatch):
    out = make_synthetic_nmr(tmp_path / "nmr", 1, seed=0, categories=["bench"])
    files = sorted(p.relative_to(out) for p in out.rglob("*"))
    calls = []

    def failing_png(array):
        calls.append(1)
        if len(calls) > 30:
            raise OSError("disk full")
        return b"png"

    monkeypatch.setattr(synthetic_module, "_png", failing_png)
    with pytest.raises(OSError, match="disk full"):
        make_synthetic_nmr(out, 1, seed=1, categories=["bench", "car"], overwrite=True)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == files
    assert [p.name for p in tmp_path.iterdir()] == ["nmr"]
