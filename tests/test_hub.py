"""Sharing on the Hub: the exported folder loads with and without the package, its card, the upload.

Nothing here touches the network: loading runs in fresh processes with ``HF_HUB_OFFLINE=1`` (a Hub
repo id is served from a Hugging Face cache the test fills) and the upload calls are mocked.
"""

import ast
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import BLOCK_PACKAGE, make_tiny_pipeline
from huggingface_hub import ModelCard
from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

import soda_diffusers
from soda_diffusers import SODANovelViewPipeline, orbit_rays
from soda_diffusers.cli import main
from soda_diffusers.hub import (
    SPACE_FILES,
    HubUploadError,
    export_for_hub,
    preset_name,
    render_dataset_card,
)
from soda_diffusers.visualize import save_gif

REPO_ID = "soda-test/tiny"
REPO_ID_NO_CODE = "soda-test/tiny-weights"  # the same repo, as far as the package's loading downloads it
SIZE = 16
EXPORTED_FILES = {
    "README.md", "model_index.json", "pipeline_soda_novel_view.py", "metrics.json", "train_summary.json",
    "train_config.json", "samples/orbit.gif", "samples/step-000300.png",
    "encoder/config.json", "encoder/diffusion_pytorch_model.safetensors", "encoder/modeling_soda.py",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/modeling_soda.py",
    "scheduler/scheduler_config.json",
}
HUB_ROOT_FILES = {"model_index.json", "pipeline_soda_novel_view.py"}
METRICS = {
    "nvs": {"psnr": 21.4567, "ssim": 0.81234, "ssim_pixelnerf": 0.84567, "lpips": None, "fg_iou": 0.81234,
            "fg_color_error": 18.345, "num_objects": 40,
            "per_category": {"car": {"psnr": 23.8765, "ssim": 0.85432, "lpips": None, "num_objects": 20},
                             "chair": {"psnr": 19.0369, "ssim": 0.77036, "lpips": None, "num_objects": 20}},
            "baselines": {"copy_source": {"psnr": 19.5432, "ssim": 0.61, "ssim_pixelnerf": 0.7246, "lpips": None,
                                          "fg_iou": 0.5936, "fg_color_error": 20.396}}},
    "probe": {"linear_acc": 0.9375, "knn_acc": 0.8125},
    "fid": 87.6543,
}
TRAIN_SUMMARY = {"train_steps": 300, "train_seconds": 754.2, "data": "/cache/synthetic-v1-30-0", "preset": "soda-tiny",
                 "batch_size": 32, "processes": 1, "matmul_dtype": "float32", "matmul_tflops_start": 0.2634,
                 "matmul_tflops_end": 0.118}
TRAIN_CONFIG = {"preset": "soda-tiny", "encoder": {}, "unet": {}, "learning_rate": 0.002,
                "encoder_learning_rate": 0.0005, "lr_scheduler": "cosine", "lr_warmup_steps": 50,
                "train_batch_size": 32, "max_train_steps": 300, "use_ema": True, "ema_decay": 0.995,
                "mixed_precision": "no", "seed": 0}

# Run first in every fresh process: any attempt to reach the network fails the test.
REFUSE_NETWORK = """
import socket

def refuse_network(*args, **kwargs):
    raise OSError("this test must not use the network")

socket.socket.connect = socket.getaddrinfo = socket.create_connection = refuse_network
"""



def generate(pipe, work: Path) -> np.ndarray:
    """The images every loading way must reproduce exactly."""
    source = PIL.Image.open(work / "source.png")
    rays = torch.load(work / "rays.pt")
    # CPU kernels sum in an order that depends on the thread count (other tests change it): the
    # fresh processes use 2 threads as well.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        generator = torch.Generator().manual_seed(0)
        return pipe(source, rays, num_inference_steps=3, generator=generator, output_type="np").images
    finally:
        torch.set_num_threads(threads)


GENERATE = """
import numpy as np
import PIL.Image
import torch

torch.set_num_threads(2)

def generate(pipe):
    source = PIL.Image.open("source.png")
    rays = torch.load("rays.pt")
    generator = torch.Generator().manual_seed(0)
    return pipe(source, rays, num_inference_steps=3, generator=generator, output_type="np").images
"""


def card_snippets(readme: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.DOTALL)


def run_python(code: str, work: Path, hf_home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    result = subprocess.run([sys.executable, "-c", REFUSE_NETWORK + code], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def work_dir(exported, tmp_path: Path) -> Path:
    """A working directory for a fresh process, with the source image, rays and reference images."""
    for name in ("source.png", "rays.pt", "expected.npy"):
        shutil.copy2(exported.work / name, tmp_path / name)
    return tmp_path


def cache_as_hub_repo(folder: Path, hf_home: Path, repo_id: str, code: bool = True) -> None:
    """Put ``folder`` into a Hugging Face cache as the main revision of the model repo ``repo_id``,
    with only the files DiffusionPipeline.download fetches (its allow_patterns: weights, configs,
    the pipeline module and ``<component>/<module>.py``); without ``code``, with none of its code."""
    repo_dir = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    component_files = {name for name in EXPORTED_FILES if name.endswith((".json", ".safetensors", ".py")) and "/" in name}
    for name in component_files | HUB_ROOT_FILES:
        if not code and name.endswith(".py"):
            continue
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(folder / name, snapshot / name)


@pytest.fixture(scope="module", autouse=True)
def refuse_network():
    def refuse(*args, **kwargs):
        raise OSError("this test must not use the network")

    with pytest.MonkeyPatch.context() as patch:
        for name in ("connect", "connect_ex"):
            patch.setattr(socket.socket, name, refuse)
        patch.setattr(socket, "getaddrinfo", refuse)
        yield


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny trained-looking run folder, pushed with --dry-run, and the reference images."""
    root = tmp_path_factory.mktemp("hub")
    # The quickstart's encoder options (flatten pooling, batch-norm statistics) must travel too.
    pipe = make_tiny_pipeline(pooling="flatten", latent_norm="batch")
    run_dir = root / "run"
    pipe.save_pretrained(run_dir)
    (run_dir / "train_summary.json").write_text(json.dumps(TRAIN_SUMMARY))
    (run_dir / "train_config.json").write_text(json.dumps(TRAIN_CONFIG))
    (run_dir / "metrics.json").write_text(json.dumps(METRICS))
    (run_dir / "samples").mkdir()
    frames = torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    save_gif(frames, run_dir / "samples" / "orbit.gif")
    for step in (150, 300):
        PIL.Image.new("RGB", (SIZE, SIZE), (step % 256, 0, 0)).save(run_dir / "samples" / f"step-{step:06d}.png")

    work = root / "work"
    work.mkdir()
    source = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    PIL.Image.fromarray(source).save(work / "source.png")
    torch.save(orbit_rays([15.0, 90.0, 210.0], size=SIZE), work / "rays.pt")
    np.save(work / "expected.npy", generate(pipe, work))

    out = root / "upload"
    assert main(["push", "--pipeline", str(run_dir), "--repo-id", REPO_ID, "--dry-run", str(out)]) == 0
    hf_home = root / "hf-home"
    cache_as_hub_repo(out, hf_home, REPO_ID)
    cache_as_hub_repo(out, hf_home, REPO_ID_NO_CODE, code=False)
    return SimpleNamespace(out=out, run_dir=run_dir, work=work, hf_home=hf_home, pipe=pipe)


def test_dry_run_writes_exactly_the_upload_folder(exported):
    files = {p.relative_to(exported.out).as_posix() for p in exported.out.rglob("*") if p.is_file()}
    assert files == EXPORTED_FILES  # the older validation grid (step 150) is left out
    index = json.loads((exported.out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_soda_novel_view", "SODANovelViewPipeline"]
    assert index["encoder"] == ["modeling_soda", "SODAEncoder"]
    assert index["unet"] == ["modeling_soda", "SODAUNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert json.loads((exported.out / "metrics.json").read_text()) == METRICS


def test_bundled_sources_stand_alone(exported):
    for name in ("pipeline_soda_novel_view.py", "encoder/modeling_soda.py", "unet/modeling_soda.py"):
        source = (exported.out / name).read_text()
        # Diffusers' own import scan (check_imports) reads every line that looks like an import.
        imported = re.findall(r"^\s*(?:from\s+(\S+)\s+import|import\s+(\S+)\s*$)", source, flags=re.MULTILINE)
        top_level = {(a or b).split(".")[0] for a, b in imported}
        assert "soda_diffusers" not in top_level, name
        assert not any((a or b).startswith(".") for a, b in imported), f"{name}: relative import"
        assert top_level <= {"__future__", "collections", "importlib", "inspect", "json", "math", "pathlib", "numpy",
                             "PIL", "torch", "diffusers"}
    encoder_source = (exported.out / "encoder" / "modeling_soda.py").read_text()
    assert "def camera_rays" in encoder_source and "class RayEncoding" in encoder_source


# From a Hub repo, DiffusionPipeline.download fetches only <component>/<module>.py of a component's code: both
# models and their helpers share one module, so each component's file is that module, as it is.
@pytest.mark.parametrize("exported_file, package_file", [
    ("pipeline_soda_novel_view.py", "pipeline_soda_novel_view.py"),
    ("encoder/modeling_soda.py", "models/modeling_soda.py"),
    ("unet/modeling_soda.py", "models/modeling_soda.py"),
])
def test_exported_sources_are_the_package_files(exported, exported_file, package_file):
    shipped = {p.relative_to(exported.out).as_posix() for p in exported.out.rglob("*.py")}
    assert shipped == {"pipeline_soda_novel_view.py", "encoder/modeling_soda.py", "unet/modeling_soda.py"}
    package_dir = Path(soda_diffusers.__file__).parent
    assert (exported.out / exported_file).read_bytes() == (package_dir / package_file).read_bytes()


@pytest.mark.slow
def test_loads_with_the_package_in_a_fresh_process(exported, tmp_path):
    code = GENERATE + textwrap.dedent(f"""
        from soda_diffusers import SODAEncoder, SODANovelViewPipeline, SODAUNet2DModel

        for name_or_path in [{str(exported.out)!r}, {REPO_ID!r}]:
            pipe = SODANovelViewPipeline.from_pretrained(name_or_path)
            assert type(pipe) is SODANovelViewPipeline, type(pipe)
            assert type(pipe.encoder) is SODAEncoder and type(pipe.unet) is SODAUNet2DModel
            pipe.set_progress_bar_config(disable=True)
            np.testing.assert_array_equal(generate(pipe), np.load("expected.npy"))
        assert not [m for m in sys.modules if m.startswith("diffusers_modules.")], "ran the bundled code"
    """)
    snippet = card_snippets(exported.out / "README.md")[0]
    assert f'SODANovelViewPipeline.from_pretrained("{REPO_ID}")' in snippet
    code += "\n" + snippet + "\nnp.save('package_snippet_rays.npy', target_rays.numpy())\n"
    run_python("import sys\n" + code, work_dir(exported, tmp_path), exported.hf_home)
    assert (tmp_path / "orbit.gif").is_file()
    np.testing.assert_array_equal(
        np.load(tmp_path / "package_snippet_rays.npy"), orbit_rays([15.0 * i for i in range(24)], size=SIZE).numpy()
    )


def test_loads_with_the_package_from_a_download_without_the_code(exported):
    # package_layout downloads no .py file: it knows the bundled modules by their names.
    pipe = SODANovelViewPipeline.from_pretrained(REPO_ID_NO_CODE, cache_dir=exported.hf_home / "hub", local_files_only=True)
    for name in ("encoder", "unet"):
        model, expected = getattr(pipe, name), getattr(exported.pipe, name)
        assert type(model) is type(expected)
        for key, tensor in expected.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], tensor, atol=0, rtol=0)


def test_an_export_from_when_each_model_had_its_module_loads_with_the_package(exported, tmp_path):
    older = tmp_path / "older"
    shutil.copytree(exported.out, older)
    index = json.loads((older / "model_index.json").read_text())
    for name, module in (("encoder", "soda_encoder"), ("unet", "soda_unet_2d")):
        (older / name / "modeling_soda.py").rename(older / name / f"{module}.py")
        index[name] = [module, index[name][1]]
    (older / "model_index.json").write_text(json.dumps(index))
    pipe = SODANovelViewPipeline.from_pretrained(older)
    assert type(pipe.encoder) is type(exported.pipe.encoder) and type(pipe.unet) is type(exported.pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(generate(pipe, exported.work), np.load(exported.work / "expected.npy"))


@pytest.mark.slow
def test_loads_without_the_package_in_a_fresh_process(exported, tmp_path):
    code = BLOCK_PACKAGE + GENERATE + textwrap.dedent(f"""
        from diffusers import DiffusionPipeline

        for name_or_path in [{str(exported.out)!r}, {REPO_ID!r}]:
            pipe = DiffusionPipeline.from_pretrained(name_or_path, trust_remote_code=True)
            assert type(pipe).__name__ == "SODANovelViewPipeline"
            for model in (pipe, pipe.encoder, pipe.unet):
                assert type(model).__module__.startswith("diffusers_modules."), type(model).__module__
            pipe.set_progress_bar_config(disable=True)
            np.testing.assert_array_equal(generate(pipe), np.load("expected.npy"))
        assert not [m for m in sys.modules if m.startswith("soda_diffusers")]
    """)
    snippet = card_snippets(exported.out / "README.md")[1]
    assert f'DiffusionPipeline.from_pretrained("{REPO_ID}", trust_remote_code=True)' in snippet
    code += "\n" + snippet + "\nnp.save('standalone_snippet_rays.npy', target_rays.numpy())\n"
    run_python(code, work_dir(exported, tmp_path), exported.hf_home)
    assert (tmp_path / "orbit.gif").is_file()
    # The card's numpy rays equal the package's (which round the camera matrices to float32).
    np.testing.assert_allclose(
        np.load(tmp_path / "standalone_snippet_rays.npy"),
        orbit_rays([15.0 * i for i in range(24)], size=SIZE).numpy(), atol=2e-6, rtol=0,
    )


def test_model_card_metadata_and_content(exported):
    card = ModelCard.load(exported.out / "README.md")
    assert card.data.library_name == "diffusers"
    assert card.data.license == "apache-2.0"
    assert set(card.data.tags) == {
        "novel-view-synthesis", "representation-learning", "soda", "diffusers:SODANovelViewPipeline", "synthetic-nmr"
    }
    text = card.text
    # The metrics file's numbers, overall and per category, the probes and FID.
    for quoted in ("| all | 40 | 21.46 | 0.812 | 0.846 | n/a | 0.812 | 18.3 |", "| car | 20 | 23.88 | 0.854 | n/a | n/a |",
                   "| chair | 20 | 19.04 | 0.770 | n/a | n/a |", "| SODA | 21.46 | 0.812 | 0.846 | n/a | 0.812 | 18.3 |",
                   "| copy the source view | 19.54 | 0.610 | 0.725 | n/a | 0.594 | 20.4 |",
                   "| linear acc | 0.938 |", "| knn acc | 0.812 |", "87.65"):
        assert quoted in text, quoted
    encoder_parameters = sum(p.numel() for p in exported.pipe.encoder.parameters())
    unet_parameters = sum(p.numel() for p in exported.pipe.unet.parameters())
    assert f"{encoder_parameters:,} (" in text and f"{unet_parameters:,} (" in text
    assert "`inverted_cosine`" in text and "`epsilon`" in text and "12 numbers" in text
    assert "source 16 px, generated views 16 px" in text and "4 random Fourier features" in text
    # The training run: steps, batch, learning rates, time.
    for quoted in ("| steps | 300 |", "| batch size | 32 |", "U-Net 0.002, encoder 0.0005", "| training time | 12.6 min |",
                   "`synthetic-v1-30-0`", "| machine speed | dense float32 matmul 0.26 TFLOP/s at the start, 0.12 at the end |"):
        assert quoted in text, quoted
    assert "![held-out objects after 300 training steps" in text and "(samples/orbit.gif)" in text
    assert "step-000150" not in text


def test_card_without_training_or_metrics(tmp_path):
    out = export_for_hub(make_tiny_pipeline(), tmp_path / "upload", repo_id="someone/model", dataset="someone/nmr-64")
    assert {p.name for p in out.iterdir()} == {
        "README.md", "model_index.json", "pipeline_soda_novel_view.py", "encoder", "unet", "scheduler"
    }
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets == ["someone/nmr-64"]
    assert card.data.tags == [
        "novel-view-synthesis", "representation-learning", "soda", "diffusers:SODANovelViewPipeline", "nmr-64"
    ]
    assert "## Training" not in card.text and "## Evaluation" not in card.text and "## Samples" not in card.text
    assert 'from_pretrained("someone/model")' in card.text
    assert "| preset | custom (no preset of soda-diffusers matches) |" in card.text


def test_explicit_samples_replace_the_found_ones(tmp_path, exported):
    orbit = tmp_path / "generated" / "chair-orbit.gif"
    orbit.parent.mkdir()
    orbit.write_bytes((exported.run_dir / "samples" / "orbit.gif").read_bytes())
    out = tmp_path / "upload"
    argv = ["push", "--pipeline", str(exported.run_dir), "--repo-id", REPO_ID, "--dry-run", str(out), "--samples", str(orbit)]
    assert main(argv) == 0
    assert [p.name for p in (out / "samples").iterdir()] == ["chair-orbit.gif"]
    assert "![chair orbit](samples/chair-orbit.gif)" in (out / "README.md").read_text()


def test_card_names_the_preset():
    preset_pipe = SODANovelViewPipeline.from_preset("soda-tiny")
    assert preset_name(preset_pipe) == "soda-tiny"
    preset_pipe.unet.register_to_config(dropout=0.5)
    assert preset_name(preset_pipe) is None


def test_export_refuses_a_non_empty_folder(tmp_path, exported, capsys):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    argv = ["push", "--pipeline", str(exported.run_dir), "--repo-id", REPO_ID, "--dry-run", str(target)]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "exists and is not an empty folder" in error
    assert (target / "notes.txt").read_text() == "mine"
    assert main(["push", "--pipeline", str(tmp_path / "missing"), "--repo-id", REPO_ID, "--dry-run", str(tmp_path / "x")]) == 2
    assert "no folder" in capsys.readouterr().err


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    """Where push_to_hub's temporary export folder goes."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_no_token_gives_one_clear_error_and_keeps_the_folder(temp_root, exported, monkeypatch, capsys):
    def create_repo(repo_id, **kwargs):
        raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")

    def upload_folder(**kwargs):
        raise AssertionError("nothing may be uploaded when the repo could not be created")

    monkeypatch.setattr("soda_diffusers.hub.create_repo", create_repo)
    monkeypatch.setattr("soda_diffusers.hub.upload_folder", upload_folder)
    with pytest.raises(HubUploadError) as raised:
        make_tiny_pipeline().push_to_hub(REPO_ID)
    message = str(raised.value)
    assert REPO_ID in message and "hf auth login" in message and "HF_TOKEN" in message and "no token found" in message
    kept = raised.value.folder
    assert kept.parent == temp_root and str(kept) in message
    assert (kept / "README.md").is_file() and (kept / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    assert main(["push", "--pipeline", str(exported.run_dir), "--repo-id", REPO_ID]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bar
    assert error.startswith("soda-nvs push: error: could not upload") and "hf auth login" in error
    assert len(list(temp_root.iterdir())) == 2


def test_no_network_during_upload_keeps_the_folder(temp_root, monkeypatch):
    monkeypatch.setattr("soda_diffusers.hub.create_repo", lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))

    def upload_folder(**kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/models/soda-test/tiny/preupload/main")

    monkeypatch.setattr("soda_diffusers.hub.upload_folder", upload_folder)
    with pytest.raises(HubUploadError, match="OfflineModeIsEnabled") as raised:
        make_tiny_pipeline().push_to_hub(REPO_ID)
    assert (raised.value.folder / "model_index.json").is_file()


def test_upload_adds_one_commit_and_deletes_nothing(temp_root, exported, monkeypatch):
    calls = {}

    def create_repo(repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return SimpleNamespace(repo_id=f"someone/{repo_id}")

    def upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        calls["upload_folder"] = kwargs
        calls["uploaded"] = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        calls["readme"] = (folder / "README.md").read_text()
        return SimpleNamespace(commit_url="https://huggingface.co/someone/tiny/commit/0123")

    monkeypatch.setattr("soda_diffusers.hub.create_repo", create_repo)
    monkeypatch.setattr("soda_diffusers.hub.upload_folder", upload_folder)
    commit = make_tiny_pipeline().push_to_hub("tiny", private=True, training_dir=exported.run_dir)
    assert commit.commit_url.endswith("/commit/0123")
    assert calls["create_repo"] == ("tiny", {"private": True, "token": None, "exist_ok": True})
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "someone/tiny"
    assert not any(key in upload for key in ("delete_patterns", "ignore_patterns", "allow_patterns"))
    assert calls["uploaded"] == EXPORTED_FILES
    # The card names the repo as create_repo completed it.
    assert 'from_pretrained("someone/tiny")' in calls["readme"]
    assert list(temp_root.iterdir()) == []  # the temporary export is gone once uploaded


# --- The Space ---------------------------------------------------------------------------------------

SPACE_ID = "soda-test/tiny-demo"


@pytest.fixture(scope="module")
def space_export(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("space") / "upload"
    assert main(["push", "--pipeline", str(exported.run_dir), "--repo-id", REPO_ID, "--space", SPACE_ID,
                 "--dry-run", str(out)]) == 0
    return out


def test_space_dry_run_writes_the_model_and_the_space_folders(space_export, exported):
    model_files = {p.relative_to(space_export / "model").as_posix() for p in (space_export / "model").rglob("*") if p.is_file()}
    assert model_files == EXPORTED_FILES
    assert {p.name for p in (space_export / "space").iterdir()} == set(SPACE_FILES)
    space = space_export / "space"
    # The demo's modules, and the models' module its cameras import, go as they are; app.py only names the model repo.
    shipped = sorted(p.relative_to(space / "soda_demo").as_posix() for p in (space / "soda_demo").rglob("*") if p.is_file())
    assert shipped == ["cameras.py", "demo.py", "models/modeling_soda.py", "schedules.py", "space_app.py"]
    for name in shipped:
        assert (space / "soda_demo" / name).read_bytes() == (Path(soda_diffusers.__file__).parent / name).read_bytes()
    top_level = set()
    for path in space.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                top_level |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                top_level.add(node.module.split(".")[0])
    assert top_level - {*sys.stdlib_module_names, "__future__"} == {"numpy", "torch", "diffusers", "PIL", "gradio", "soda_demo"}
    app = (space / "app.py").read_text()
    assert re.search(rf"^MODEL_ID = {REPO_ID!r}$", app, flags=re.MULTILINE)
    # What app.py and the model's bundled code import, with the bounds setup.cfg gives them.
    requirements = (space_export / "space" / "requirements.txt").read_text().split()
    assert requirements == ["diffusers>=0.42", "numpy>=2.4", "pillow>=12.3", "torch>=2.13"]


def test_space_card_metadata(space_export):
    import importlib.metadata

    from huggingface_hub import SpaceCard

    card = SpaceCard.load(space_export / "space" / "README.md")
    data = card.data.to_dict()
    assert data["sdk"] == "gradio" and data["app_file"] == "app.py" and data["models"] == [REPO_ID]
    assert data["sdk_version"] == importlib.metadata.version("gradio")
    assert f"https://huggingface.co/{REPO_ID}" in card.text and "python app.py" in card.text


@pytest.mark.slow
def test_space_app_generates_what_the_package_does_without_the_package(space_export, exported, tmp_path):
    """The Space's app.py, run in a process that cannot import soda_diffusers, on the pipeline loaded from
    the model folder with its bundled code: the demo's generate_view it serves gives the package's images."""
    from soda_diffusers.demo import Settings, generate_view

    source = PIL.Image.open(exported.work / "source.png")
    settings = Settings("DPM-Solver", steps=4, seed=3)
    expected = np.asarray(generate_view(exported.pipe, source, 120.0, 20.0, settings))
    np.save(tmp_path / "expected_view.npy", expected)
    code = BLOCK_PACKAGE + textwrap.dedent(f"""
        import runpy
        import numpy as np
        import PIL.Image
        from diffusers import DiffusionPipeline

        app = runpy.run_path({str(space_export / "space" / "app.py")!r})  # not __main__: nothing is served
        from soda_demo.demo import Settings, generate_view  # importable as app.py made it

        assert app["main"].__module__ == "soda_demo.space_app"
        pipe = DiffusionPipeline.from_pretrained({str(space_export / "model")!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        view = generate_view(pipe, PIL.Image.open("source.png"), 120.0, 20.0, Settings("DPM-Solver", steps=4, seed=3))
        np.testing.assert_array_equal(np.asarray(view), np.load("expected_view.npy"))
        assert not [m for m in sys.modules if m.startswith("soda_diffusers")]
    """)
    run_python(code, work_dir(exported, tmp_path), exported.hf_home)


def test_push_with_space_uploads_the_model_then_the_space(temp_root, exported, monkeypatch, capsys):
    calls = []

    def create_repo(repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"someone/{repo_id}")

    def upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        app = (folder / "app.py").read_text() if (folder / "app.py").is_file() else None
        calls.append(("upload_folder", kwargs["repo_id"], kwargs.get("repo_type"), files, app))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0123",
                               repo_url=SimpleNamespace(repo_id=kwargs["repo_id"]))

    monkeypatch.setattr("soda_diffusers.hub.create_repo", create_repo)
    monkeypatch.setattr("soda_diffusers.hub.upload_folder", upload_folder)
    assert main(["push", "--pipeline", str(exported.run_dir), "--repo-id", "tiny", "--space", "tiny-demo"]) == 0
    (_, model_repo, model_kwargs), model_upload, (_, space_repo, space_kwargs), space_upload = calls
    assert model_repo == "tiny" and "repo_type" not in model_kwargs and model_upload[3] == EXPORTED_FILES
    assert space_repo == "tiny-demo" and space_kwargs["repo_type"] == "space" and space_kwargs["space_sdk"] == "gradio"
    space_files = {"app.py", "README.md", "requirements.txt", *(f"soda_demo/{name}.py" for name in
                                                              ("cameras", "demo", "models/modeling_soda", "schedules", "space_app"))}
    assert space_upload[1:4] == ("someone/tiny-demo", "space", space_files)
    # The Space serves the model repo under the name create_repo completed.
    assert "MODEL_ID = 'someone/tiny'" in space_upload[4]
    assert "uploaded the Space: https://huggingface.co/someone/tiny-demo/commit/0123" in capsys.readouterr().out
    assert list(temp_root.iterdir()) == []


def test_a_refused_space_upload_keeps_its_folder(temp_root, exported, monkeypatch, capsys):
    def create_repo(repo_id, **kwargs):
        if kwargs.get("repo_type") == "space":
            raise LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")
        return SimpleNamespace(repo_id=repo_id)

    monkeypatch.setattr("soda_diffusers.hub.create_repo", create_repo)
    monkeypatch.setattr("soda_diffusers.hub.upload_folder",
                        lambda **kwargs: SimpleNamespace(commit_url="https://huggingface.co/x/commit/1"))
    assert main(["push", "--pipeline", str(exported.run_dir), "--repo-id", REPO_ID, "--space", SPACE_ID]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"soda-nvs push: error: could not upload to the Hugging Face Hub space {SPACE_ID!r}")
    assert "--repo-type space" in error
    kept, = temp_root.iterdir()
    assert {p.name for p in kept.iterdir()} == set(SPACE_FILES) and str(kept) in error


def test_dataset_card(tmp_path):
    import datasets

    from soda_diffusers.data.arrow import nmr_features

    size = 8
    features = nmr_features(size, ["02958343", "03001627"])
    def rows(objects):
        return {
            "object_id": [f"{synset}/{i}" for i, (synset, _) in enumerate(objects)],
            "category": [synset for synset, _ in objects],
            "category_name": [name for _, name in objects],
            "label": [0 if synset == "02958343" else 1 for synset, _ in objects],
            "split": ["x"] * len(objects),
            "images": [np.zeros((24, size, size, 3), np.uint8)] * len(objects),
            "masks": [np.zeros((24, size, size), np.uint8)] * len(objects),
            **{key: [np.eye(4)[None].repeat(24, 0)] * len(objects)
               for key in ("world_mat", "world_mat_inv", "camera_mat", "camera_mat_inv")},
        }
    splits = {"train": [("02958343", "car")] * 3 + [("03001627", "chair")] * 2, "test": [("03001627", "chair")]}
    datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(rows(objects), features=features) for split, objects in splits.items()}
    ).save_to_disk(str(tmp_path / "nmr-arrow"))

    card = render_dataset_card(tmp_path / "nmr-arrow", repo_id="someone/nmr-8px", source="NMR_Dataset.zip")
    card.save(tmp_path / "README.md")
    data = type(card).load(tmp_path / "README.md").data
    assert data.license == "other" and data.size_categories == ["n<1K"] and "nmr" in data.tags
    assert "| car (02958343) | 3 | 0 |" in card.text and "| chair (03001627) | 2 | 1 |" in card.text
    assert "| **all** | **5** | **1** |" in card.text and "(6 in all)" in card.text and "`masks`" in card.text and "(24, 8, 8, 3)" in card.text
    assert 'load_dataset("someone/nmr-8px", split="train")' in card.text
