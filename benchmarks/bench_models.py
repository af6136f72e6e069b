"""Model throughput on this machine: training steps (samples/s), DDIM-50 sampling (images/s), peak
memory, and the fraction of the machine's dense matmul throughput the models reach.

    python benchmarks/bench_models.py [--presets soda-tiny soda-nmr-32] [--batch 32] [--threads N]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from soda_diffusers import SODANovelViewPipeline, orbit_rays


def matmul_gflops(size: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench_preset(name: str, batch: int, steps: int, sample_batch: int) -> dict:
    pipe = SODANovelViewPipeline.from_preset(name)
    pipe.set_progress_bar_config(disable=True)
    encoder, unet = pipe.encoder.train(), pipe.unet.train()
    size = unet.config.sample_size
    source = torch.rand(batch, 3, size, size) * 2 - 1
    target = torch.rand(batch, 3, size, size) * 2 - 1
    rays = orbit_rays([15.0 * (i % 24) for i in range(batch)], size=size)
    timesteps = torch.randint(0, 1000, (batch,))
    optimizer = torch.optim.AdamW([*encoder.parameters(), *unet.parameters()], lr=1e-4)

    def train_step():
        loss = (unet(target, timesteps, rays, encoder(source)).sample - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        train_step()
    step_flops = counter.get_total_flops()
    step_seconds = timed(train_step, steps)

    pipe.encoder.eval(), pipe.unet.eval()
    sample_rays = orbit_rays([15.0 * (i % 24) for i in range(sample_batch)], size=size)

    def sample():
        pipe(source[0], sample_rays, num_inference_steps=50, output_type="pt")

    with FlopCounterMode(display=False) as counter:
        sample()
    sample_flops = counter.get_total_flops()
    sample_seconds = timed(sample, 1)
    parameters = sum(p.numel() for p in [*encoder.parameters(), *unet.parameters()])
    return {
        "preset": name,
        "params_M": parameters / 1e6,
        "train_samples_per_s": batch / step_seconds,
        "train_step_s": step_seconds,
        "train_gflops_per_s": step_flops / step_seconds / 1e9,
        "ddim50_images_per_s": sample_batch / sample_seconds,
        "sample_gflops_per_s": sample_flops / sample_seconds / 1e9,
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["soda-tiny", "soda-nmr-32"])
    parser.add_argument("--batch", type=int, default=32, help="training batch size")
    parser.add_argument("--sample-batch", type=int, default=8, help="images per sampling call")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_gflops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dense fp32 matmul: {peak:.1f} GFLOP/s")
    print(f"{'preset':<12} {'params':>8} {'train samples/s':>16} {'step s':>7} {'train %peak':>11} "
          f"{'DDIM-50 img/s':>14} {'sample %peak':>12} {'peak RSS MiB':>13}")
    for name in args.presets:
        r = bench_preset(name, args.batch, args.steps, args.sample_batch)
        print(f"{r['preset']:<12} {r['params_M']:>7.1f}M {r['train_samples_per_s']:>16.1f} {r['train_step_s']:>7.2f} "
              f"{100 * r['train_gflops_per_s'] / peak:>10.0f}% {r['ddim50_images_per_s']:>14.2f} "
              f"{100 * r['sample_gflops_per_s'] / peak:>11.0f}% {r['peak_rss_mib']:>13.0f}")


if __name__ == "__main__":
    main()
