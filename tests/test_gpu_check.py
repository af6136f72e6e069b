"""benchmarks/gpu_check.py: its CPU dry run goes through both stages and leaves what a GPU run sends back;
its option choice and its offline wheel install."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gpu_check(monkeypatch):
    # main() sets the variables its children read and puts the checkout on sys.path: undone after the test.
    monkeypatch.delenv("SODA_DIFFUSERS_CACHE", raising=False)
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setattr(sys, "path", list(sys.path))
    return load_gpu_check()


@pytest.mark.slow
def test_the_dry_run_of_both_stages_leaves_what_a_gpu_run_sends_back(gpu_check, tmp_path):
    work, wheels = tmp_path / "work", tmp_path / "no-wheels"
    common = ["--dry-run", "--work", str(work), "--wheels", str(wheels)]
    assert gpu_check.main([*common, "--stage", "1", "--out", str(tmp_path / "out1")]) == 0
    assert gpu_check.main([*common, "--stage", "2", "--out", str(tmp_path / "out2")]) == 0

    out = tmp_path / "out2"
    files = sorted(path.relative_to(out) for path in out.rglob("*"))
    assert [str(f) for f in files] == sorted(["summary.md", "metrics-nmr-32.json", "metrics-nmr-64.json",
                                              "sheet.png", "gpu_check.tar.gz", "log.txt"])
    assert len(files) <= 8 and all(len(f.parts) <= 3 for f in files)

    summary = (out / "summary.md").read_text()
    assert "| | nmr-32 | nmr-64 |" in summary
    assert "`pytest tests/test_gpu.py -ra`: 6 skipped" in summary  # no CUDA here: every GPU test skips
    assert "## Stage 0" in summary and "Ready in" in summary
    assert summary.count("| soda-tiny | none |") == 2 and "Failed" not in summary
    for run in ("nmr-32", "nmr-64"):
        nvs = json.loads((out / f"metrics-{run}.json").read_text())["nvs"]
        assert nvs["split"] == "val" and nvs["objects"] == 2
        assert math.isfinite(nvs["psnr"]) and set(nvs["baselines"]) == {"copy_source", "mean_image", "other_source"}
        assert f"{nvs['psnr']:.2f}" in summary

        record = json.loads((work / "results" / run / "run.json").read_text())
        assert record["option"] in ("none", "channels_last") and record["minutes"] == pytest.approx(1 / 3, abs=1e-3)
        log = [json.loads(line) for line in (work / "results" / run / "train_log.jsonl").read_text().splitlines()]
        assert log[-1]["lr"] == 0.0 and log[-1]["elapsed_s"] >= 15  # trained by the clock (20 s, or its step cap), annealed
        assert f"train_soda.py --config {run} --data " in summary and "--max_train_minutes 0.333" in summary
    assert "shortened" not in summary  # the dry run has no stage time limit

    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        names = set(tar.getnames())
    for run in ("nmr-32", "nmr-64"):
        assert {f"results/{run}/{name}" for name in ("bench.json", "metrics.md", "train_log.jsonl", "samples.png",
                                                     "curves.png", "log.txt")} <= names

    # Stage 1's archive alone (a fresh machine, an emptied $OUT) still gives its run to a later summary.
    fresh = tmp_path / "fresh"
    assert gpu_check.main(["--stage", "summary", "--work", str(fresh), "--wheels", str(wheels), "--out",
                           str(tmp_path / "out3"), "--previous", str(tmp_path / "out1")]) == 0
    assert (tmp_path / "out3" / "metrics-nmr-32.json").is_file()
    assert not (tmp_path / "out3" / "metrics-nmr-64.json").exists()
    assert "| | nmr-32 |" in (tmp_path / "out3" / "summary.md").read_text()


def test_the_option_chosen_trains_the_most_samples_in_the_minutes_given():
    gpu_check = load_gpu_check()
    bench = {"rows": [
        {"option": "none", "train_samples_per_s": 1000.0, "compile_s": 0.0},
        {"option": "compile", "train_samples_per_s": 2000.0, "compile_s": 100.0},
        {"option": "all", "error": "RuntimeError: compiler failed"},
    ]}
    assert gpu_check.choose_option(bench, 150) == ("none", 150_000.0)  # 100,000 samples with compile
    assert gpu_check.choose_option(bench, 600) == ("compile", 1_000_000.0)
    assert gpu_check.choose_option(None, 600) == ("none", None)
    assert gpu_check.OPTION_FLAGS["all"] == ["--channels_last", "--allow_tf32", "--fused_adamw", "--torch_compile"]


def make_wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel of one module ``name`` returning 42."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {f"{name}.py": "ANSWER = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{member},,\n" for member in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_wheels_are_installed_offline_only_where_missing(gpu_check, tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "soda_gpu_check_probe")
    make_wheel(wheels, "pytest")  # installed already: left alone
    site = tmp_path / "site"
    gpu_check.install_wheels(wheels, site)
    assert (site / "soda_gpu_check_probe.py").is_file() and not (site / "pytest.py").exists()
    assert str(site) in sys.path and str(site) in gpu_check.os.environ["PYTHONPATH"].split(":")
    import soda_gpu_check_probe

    assert soda_gpu_check_probe.ANSWER == 42
    monkeypatch.delitem(sys.modules, "soda_gpu_check_probe")


def test_a_step_out_of_time_is_stopped_with_its_children(gpu_check, tmp_path):
    check = gpu_check.Check(gpu_check.parse_args(["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]))
    # The grandchild keeps the output pipe open: only stopping the whole process group ends the read.
    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "print('started', flush=True); time.sleep(60)")
    start = gpu_check.time.monotonic()
    code, tail = check.run([sys.executable, "-c", script], "sleeper", timeout=2)
    assert gpu_check.time.monotonic() - start < 30
    assert code != 0 and "started" in tail
    assert check.failures == [f"sleeper (exit code {code} (stopped: out of time))"]


def test_the_ema_decay_fits_the_steps_the_run_will_take():
    gpu_check = load_gpu_check()
    assert gpu_check.fitting_ema_decay(0.9999, 200_000) == 0.9999
    assert gpu_check.fitting_ema_decay(0.9999, 5_000) == 0.999  # a 10,000-step window in 5,000 steps: mostly the start
    assert gpu_check.fitting_ema_decay(0.9999, 500) == 0.99
    assert gpu_check.fitting_ema_decay(0.9999, None) == 0.999
    assert gpu_check.fitting_ema_decay(0.995, 100_000) == 0.995


def dry_args(tmp_path, *extra):
    return ["--dry-run", "--stage", "1", "--work", str(tmp_path / "work"), "--wheels", str(tmp_path / "wheels"),
            "--out", str(tmp_path / "out"), *extra]


def test_a_wheel_that_fails_to_install_stops_the_command_at_stage_0_and_says_why(gpu_check, tmp_path):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "soda_broken_probe-1.0-py3-none-any.whl").write_bytes(b"not a zip archive")
    assert gpu_check.main(dry_args(tmp_path)) == 1
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "stage 0: installing the wheels" in summary and "soda_broken_probe-1.0-py3-none-any.whl" in summary
    assert "## Stage 0" in summary and "## Tests" not in summary
    assert "soda_broken_probe" in (tmp_path / "out" / "log.txt").read_text()  # pip's own words are in the log
    assert not (tmp_path / "work" / "results" / "nmr-32").exists()


@pytest.mark.slow
def test_a_child_that_hangs_is_stopped_at_its_timeout_and_what_finished_is_published(gpu_check, tmp_path, monkeypatch):
    def quick_tests(check, timeout=None):
        (check.results / "tests.json").write_text(json.dumps({"exit_code": 0, "summary": "6 skipped in 0.1s"}))

    def quick_bench(check, config, size, json_path):
        bench = {"batch": 2, "sample_batch": 1, "rows": [], "table": ["| preset | option |", "| quick | none |"]}
        return ["-c", f"import json; json.dump({bench!r}, open({str(json_path)!r}, 'w'))"]

    def hanging_training(*args, **kwargs):
        return ["-c", "import time; print('training', flush=True); time.sleep(600)"]

    monkeypatch.setattr(gpu_check, "run_tests", quick_tests)
    monkeypatch.setattr(gpu_check, "bench_argv", quick_bench)
    monkeypatch.setattr(gpu_check, "train_argv", hanging_training)
    start = time.monotonic()
    assert gpu_check.main(dry_args(tmp_path, "--minutes", "0.02", "--train-grace", "2")) == 1
    assert time.monotonic() - start < 60
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "train nmr-32 (exit code -9 (stopped: out of time))" in summary
    assert "6 skipped in 0.1s" in summary and "| quick | none |" in summary
    record = json.loads((tmp_path / "work" / "results" / "nmr-32" / "run.json").read_text())
    assert record["timings_s"]["train"] < 10 and "evaluate" in record["timings_s"]


@pytest.mark.slow
def test_a_command_killed_part_way_leaves_the_summary_of_what_finished(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *dry_args(tmp_path)],
                               cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    # Killed (SIGKILL: nothing runs after it) once the bench is published, while the training runs.
    while not ((out / "summary.md").is_file() and "## Benchmarks" in (out / "summary.md").read_text()):
        assert process.poll() is None and time.monotonic() < deadline, "the dry run ended before the bench was published"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    summary = (out / "summary.md").read_text()
    assert "## Stage 0" in summary and "6 skipped" in summary and "| soda-tiny | none |" in summary
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        assert "results/nmr-32/bench.json" in tar.getnames()
