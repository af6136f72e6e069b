"""The benchmark scripts run and report sane figures (their numbers belong in closing notes, not here)."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("option", ["none", "channels_last", "math"])
def test_bench_models_reports_throughput_flops_and_memory(option):
    bench = load("bench_models")
    row = bench.bench_preset("soda-tiny", batch=2, steps=1, sample_batch=1, option=option)
    assert row["train_samples_per_s"] > 0 and row["ddim50_images_per_s"] > 0
    assert row["train_tflops_per_s"] > 0 and row["peak_memory_gib"] > 0
    assert row["option"] == option and row["compile_s"] == 0
    with pytest.raises(ValueError, match="option"):
        bench.bench_preset("soda-tiny", batch=2, steps=1, sample_batch=1, option="turbo")


def test_the_matmul_peak_is_measured_without_moving_the_global_random_stream():
    import torch

    from soda_diffusers.hardware import matmul_peak_tflops

    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    peak = matmul_peak_tflops(torch.device("cpu"), size=64, repeats=2)
    assert 0 < peak < 1e4
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.slow
def test_bench_train_runs_the_training_script_with_the_thread_settings_it_is_given(tmp_path, monkeypatch):
    from soda_diffusers.data import make_synthetic_nmr

    bench = load("bench_train")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert "OMP_WAIT_POLICY" not in bench.run_environment("default")  # the script chooses
    env = bench.run_environment("OMP_WAIT_POLICY=PASSIVE,GOMP_SPINCOUNT=")
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["GOMP_SPINCOUNT"] == ""

    data = tmp_path / "nmr"
    make_synthetic_nmr(data, objects_per_category=3, seed=0, categories=["airplane", "car", "chair"])
    row = bench.bench_run("synthetic-tiny", steps=3, warmup=1, batch=2, data=str(data), workers=0,
                          cache_dir=str(tmp_path / "stores"), env=env)
    assert row["samples_per_s"] > 0 and row["peak_rss_mib"] > 0
    assert row["thread_settings"] == {"source": "user", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": ""}


def test_busy_processes_keep_a_core_busy_only_inside_the_block():
    from soda_diffusers.threads import cores_in_use

    bench = load("bench_train")
    with bench.busy_processes(1) as processes:
        busy = cores_in_use(0.3)
        assert all(process.poll() is None for process in processes)
    assert all(process.poll() is not None for process in processes)
    assert busy is None or busy >= 0.5
