"""How fast this machine is right now: the dense matmul throughput that training steps are measured against.

The same CPU gives half its speed on some days (shared or throttled cores), so a run's steps and scores
only compare with another run's beside the speed each one had. ``benchmarks/bench_models.py`` reports
its steps as a fraction of this peak, and ``training/train_soda.py`` records it at both ends of a run.
"""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None,
                       repeats: int = 20) -> float:
    """Dense ``size`` x ``size`` matmul throughput on ``device`` in TFLOP/s (default size: 8192 on a GPU,
    1024 on CPU, about a third of a second on either)."""
    size = size or (8192 if device.type == "cuda" else 1024)
    # Its own generator: measuring must not move the global stream that training draws from.
    generator = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(size, size, device=device, dtype=dtype, generator=generator) for _ in range(2))
    a @ b  # the first call pays for allocation and kernel selection
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12
