"""OpenMP's wait policy: chosen by the entry points before torch loads, never by importing the package,
and a value the user set is kept. Each case runs in a fresh interpreter (torch must not be loaded yet)."""

import json
import os
import subprocess
import sys

import pytest

from soda_diffusers.threads import THREAD_VARIABLES, cores_in_use


def run_python(code: str, **env_settings) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env.update(env_settings)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


CHOOSE = """
import json, os, sys
from soda_diffusers.threads import set_wait_policy
choice = set_wait_policy(busy_cores={busy})
print(json.dumps({{"choice": choice, "env": os.environ.get("OMP_WAIT_POLICY"), "again": set_wait_policy(busy_cores=0.0)}}))
"""


def test_importing_the_package_loads_no_torch_and_sets_nothing():
    found = run_python(
        "import json, os, sys; import soda_diffusers; from soda_diffusers import threads; "
        "print(json.dumps({'torch': 'torch' in sys.modules, 'env': [v for v in threads.THREAD_VARIABLES if v in os.environ]}))"
    )
    assert found == {"torch": False, "env": []}


def test_busy_cores_make_threads_wait_passively():
    found = run_python(CHOOSE.format(busy=1.0))
    assert found["env"] == "PASSIVE"
    assert found["choice"]["OMP_WAIT_POLICY"] == "PASSIVE" and "1.0 cores busy" in found["choice"]["source"]
    assert found["again"] == found["choice"]  # one choice per process


def test_idle_cores_keep_openmps_default():
    found = run_python(CHOOSE.format(busy=0.1))
    assert found["env"] is None
    assert "OMP_WAIT_POLICY" not in found["choice"] and "default" in found["choice"]["source"]


@pytest.mark.parametrize("name,value", [("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "1000"), ("OMP_WAIT_POLICY", "")])
def test_a_value_the_user_set_is_kept(name, value):
    found = run_python(CHOOSE.format(busy=2.0), **{name: value})
    assert found["choice"] == {"source": "user", name: value}
    assert found["env"] == (value if name == "OMP_WAIT_POLICY" else None)


def test_nothing_is_set_once_torch_is_loaded():
    found = run_python("import torch\n" + CHOOSE.format(busy=2.0))
    assert found["env"] is None and "torch was imported first" in found["choice"]["source"]


@pytest.mark.slow
def test_the_cli_chooses_before_its_commands_load_torch():
    found = run_python(
        "import contextlib, io, json, sys\n"
        "from soda_diffusers import cli, threads\n"
        "torch_at_start = 'torch' in sys.modules\n"
        "with contextlib.redirect_stdout(io.StringIO()): cli.main([])\n"
        "print(json.dumps({'torch_at_start': torch_at_start, 'torch_after': 'torch' in sys.modules, "
        "'choice': threads.set_wait_policy(busy_cores=2.0)}))"
    )
    assert found["torch_at_start"] is False and found["torch_after"] is True
    assert found["choice"]["source"].startswith("soda-diffusers")


def test_cores_in_use_is_a_share_of_the_machine():
    busy = cores_in_use(0.05)
    if busy is None:
        pytest.skip("no /proc/stat on this system: the wait policy falls back to OpenMP's default")
    assert 0.0 <= busy <= os.cpu_count()
