"""How PyTorch's OpenMP threads wait for each other, chosen by the command-line entry points and the
training script before torch is imported: OpenMP reads its settings once, when torch loads it.

A thread that has finished its share of an operation either spins, holding its core, until the next one
starts, or sleeps. Spinning (OpenMP's default) is fast on an idle machine; when another process computes
on the same cores, a spinning thread holds a core that its partner needs, and a training step gets many
times slower. No one setting is near the best in both cases (docs/results.md#sharing-the-cores,
``benchmarks/bench_train.py --env ... --busy 0 1``), so :func:`set_wait_policy` looks at the cores for a
moment at start-up: when other processes use at least :data:`BUSY_CORES` of them it sets
``OMP_WAIT_POLICY=PASSIVE``, otherwise it leaves OpenMP's default. A value the user set for any of
:data:`THREAD_VARIABLES` is kept. The choice holds for the whole process: work that starts on the same
cores later still slows a run that chose to spin (set ``OMP_WAIT_POLICY=PASSIVE`` where that is expected).

This module imports neither torch nor anything that does.
"""

from __future__ import annotations

import os
import sys
import time

THREAD_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
BUSY_CORES = 0.5  # other processes' use of the cores, in cores, from which threads wait passively
SAMPLE_SECONDS = 0.25

_chosen: dict | None = None


def cores_in_use(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many cores the machine kept busy over ``seconds`` (this process sleeps meanwhile, so the
    figure is the other processes'), from Linux's ``/proc/stat``; None where it cannot be read."""
    def totals():
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
        return sum(fields[:8]) - idle, sum(fields[:8])

    try:
        busy_before, total_before = totals()
        time.sleep(seconds)
        busy_after, total_after = totals()
    except (OSError, ValueError, IndexError):
        return None
    if total_after <= total_before:
        return None
    return (os.cpu_count() or 1) * (busy_after - busy_before) / (total_after - total_before)


def set_wait_policy(busy_cores: float | None = None) -> dict:
    """Choose OpenMP's waiting for this process (see the module docstring), unless the user set it or
    torch is already loaded, and return the choice for reports: ``source`` and the variables of
    :data:`THREAD_VARIABLES` in force. Call it before importing torch; a later call returns the first
    one's choice. ``busy_cores`` replaces the measurement (tests)."""
    global _chosen
    if _chosen is None:
        user_set = {name: os.environ[name] for name in THREAD_VARIABLES if name in os.environ}
        if user_set:
            _chosen = {"source": "user", **user_set}
        elif "torch" in sys.modules:
            # OpenMP has read its settings already: setting them now would only mislead child processes.
            _chosen = {"source": "OpenMP's default (torch was imported first)"}
        else:
            busy = cores_in_use() if busy_cores is None else busy_cores
            if busy is not None and busy >= BUSY_CORES:
                os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
                _chosen = {"source": f"soda-diffusers: {busy:.1f} cores busy at start", "OMP_WAIT_POLICY": "PASSIVE"}
            else:
                state = "unknown" if busy is None else f"{busy:.1f} cores busy"
                _chosen = {"source": f"soda-diffusers: OpenMP's default, {state} at start"}
    return dict(_chosen)
