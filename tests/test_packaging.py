"""What a non-editable install gets: every package, the presets, the training script and the card templates
copied into the wheel (no links), and a working ``soda-nvs quickstart``."""

import configparser
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import train_flags

from soda_diffusers.data import make_synthetic_nmr

REPO = Path(__file__).resolve().parents[1]


def declared_packages() -> list[str]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    return config["options"]["packages"].split()


def test_setup_cfg_lists_every_package_and_the_package_holds_no_links():
    code_packages = sorted(
        ".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "soda_diffusers").rglob("__init__.py")
    )
    declared = declared_packages()
    assert sorted(name for name in declared if name not in ("soda_diffusers.presets", "soda_diffusers.training",
                                                            "soda_diffusers.model_cards")) == code_packages
    assert [path for path in (REPO / "soda_diffusers").rglob("*") if path.is_symlink()] == []


def test_the_old_import_paths_of_the_renamed_evaluation_modules_still_work():
    import warnings

    from soda_diffusers.evaluation import (  # soda_diffusers/evaluation.py's names
        generate_views_per_seed,
        runner,
        view_scores,
        views,
    )

    assert generate_views_per_seed is views.generate_views_per_seed and view_scores is views.view_scores
    sys.modules.pop("soda_diffusers.evaluate_nvs", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import soda_diffusers.evaluate_nvs as old
        from soda_diffusers.evaluate_nvs import PairScorer, evaluate, run_nvs
    assert old is runner and (evaluate, run_nvs, PairScorer) == (runner.evaluate, runner.run_nvs, runner.PairScorer)
    assert any("soda_diffusers.evaluation.runner" in str(w.message) for w in caught)


@pytest.mark.slow
def test_a_wheel_install_runs_the_quickstart_outside_the_checkout(tmp_path):
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 70:  # offline, the build uses the setuptools installed here
        pytest.skip(f"setuptools {setuptools.__version__} cannot build a wheel by itself: pip install 'setuptools>=70'")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(REPO)], check=True, cwd=tmp_path)
    installed = site / "soda_diffusers"
    for path in ("presets/soda-tiny/unet/config.json", "training/train_soda.py", "training/configs/synthetic-tiny.yaml",
                 "model_cards/pipeline_card_template.md"):
        assert (installed / path).is_file() and not (installed / path).is_symlink(), path
    data = make_synthetic_nmr(tmp_path / "nmr", objects_per_category=3, seed=0, categories=["car", "chair"])
    train_args = shlex.join(train_flags(data, tmp_path / "qs" / "train", steps=2)[4:])  # the tiny model's flags
    env = dict(os.environ, PYTHONPATH=str(site))
    command = [sys.executable, "-c", "import sys, soda_diffusers.cli as cli; print(cli.__file__); sys.exit(cli.main())",
               "quickstart", "--steps", "2", "--data", str(data), "--objects", "2", "--out", str(tmp_path / "qs"),
               "--train-args", train_args]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == str(installed / "cli.py")
    assert f"training: python {installed / 'training' / 'train_soda.py'}" in result.stdout
    assert json.loads((tmp_path / "qs" / "quickstart.json").read_text())["train_steps"] == 2
