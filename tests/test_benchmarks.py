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
