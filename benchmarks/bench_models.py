"""Model throughput: training steps (samples/s), DDIM-50 sampling (images/s), peak memory, and the
fraction of the device's dense matmul peak the training step reaches (counted with PyTorch's flop
counter, against a large matmul timed on the same device in the same run: bf16 on a GPU, fp32 on CPU).

    python benchmarks/bench_models.py [--presets soda-tiny soda-nmr-32] [--batch 32] [--threads N] [--unet JSON]
    python benchmarks/bench_models.py --device cuda --presets soda-nmr-64 --batch 128 --precision bf16 \\
        --options none channels_last tf32 fused compile all [--json bench.json]

On a GPU each ``--options`` entry is one row (the speed flags of ``training/train_soda.py``: ``channels_last``,
``tf32``, ``fused`` AdamW, ``compile`` (torch.compile, its time reported apart), ``flash``/``math``
attention backends, ``all`` = every flag but a forced attention backend), so a flag's gain is measured
before it becomes a default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import time

from soda_diffusers.threads import set_wait_policy

THREAD_SETTINGS = set_wait_policy()  # as the entry points choose it, before torch loads (soda_diffusers.threads)

import torch
from torch.utils.flop_counter import FlopCounterMode

from soda_diffusers import SODANovelViewPipeline, orbit_rays
from soda_diffusers.hardware import matmul_peak_tflops, synchronize

OPTIONS = ("none", "channels_last", "tf32", "fused", "compile", "flash", "math", "all")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def bench_preset(name: str, batch: int, steps: int, sample_batch: int, device: torch.device | str = "cpu",
                 precision: str = "fp32", option: str = "none", **overrides) -> dict:
    """One row: ``overrides`` change the preset's component configs, as ``train_soda.py``'s ``--encoder``
    and ``--unet`` do (``unet={"layers_per_block": 1}``)."""
    device = torch.device(device)
    if option not in OPTIONS:
        raise ValueError(f"option: expected one of {OPTIONS}, got {option!r}")
    flags = {"channels_last", "tf32", "fused", "compile"} if option == "all" else {option}
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = "tf32" in flags
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    pipe = SODANovelViewPipeline.from_preset(name, **overrides).to(device)
    pipe.set_progress_bar_config(disable=True)
    encoder, unet = pipe.encoder.train(), pipe.unet.train()
    memory_format = torch.channels_last if "channels_last" in flags else torch.contiguous_format
    encoder.to(memory_format=memory_format)
    unet.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *unet.parameters()], lr=1e-4,
                                  fused=True if "fused" in flags else None)
    encoder_step, unet_step = encoder, unet
    if "compile" in flags:
        encoder_step, unet_step = torch.compile(encoder), torch.compile(unet)
    size = unet.config.sample_size
    source = (torch.rand(batch, 3, size, size, device=device) * 2 - 1).contiguous(memory_format=memory_format)
    target = (torch.rand(batch, 3, size, size, device=device) * 2 - 1).contiguous(memory_format=memory_format)
    rays = orbit_rays([15.0 * (i % 24) for i in range(batch)], size=size).to(device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    attention = contextlib.nullcontext
    if flags & {"flash", "math"}:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.FLASH_ATTENTION if "flash" in flags else SDPBackend.MATH
        attention = lambda: sdpa_kernel(backend)  # noqa: E731

    def train_step():
        with autocast, attention():
            loss = (unet_step(target, timesteps, rays, encoder_step(source)).sample.float() - target).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    train_step()  # compiles, with torch.compile
    synchronize(device)
    first_step_seconds = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:
        with autocast:
            loss = (unet(target, timesteps, rays, encoder(source)).sample.float() - target).square().mean()
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    step_flops = counter.get_total_flops()
    step_seconds = timed(train_step, steps, device)
    train_memory = peak_memory_gib(device)

    encoder.eval(), unet.eval()
    sample_rays = orbit_rays([15.0 * (i % 24) for i in range(sample_batch)], size=size).to(device)

    def sample():
        with autocast:
            pipe(source[0], sample_rays, num_inference_steps=50, output_type="pt")

    sample_seconds = timed(sample, 1, device)
    parameters = sum(p.numel() for p in [*encoder.parameters(), *unet.parameters()])
    return {
        "preset": name,
        "option": option,
        "params_M": parameters / 1e6,
        "train_samples_per_s": batch / step_seconds,
        "train_step_s": step_seconds,
        "compile_s": first_step_seconds - step_seconds if "compile" in flags else 0.0,
        "train_tflops_per_s": step_flops / step_seconds / 1e12,
        "ddim50_images_per_s": sample_batch / sample_seconds,
        "peak_memory_gib": train_memory,
    }


TABLE_HEADER = (
    "| preset | option | params | train samples/s | step s | compile s | TFLOP/s | % of peak | DDIM-50 images/s | "
    "peak memory |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
)


def table_row(r: dict) -> str:
    return (f"| {r['preset']} | {r['option']} | {r['params_M']:.1f}M | {r['train_samples_per_s']:.1f} | "
            f"{r['train_step_s']:.3f} | {r['compile_s']:.0f} | {r['train_tflops_per_s']:.3f} | "
            f"{r['percent_of_peak']:.1f}% | {r['ddim50_images_per_s']:.2f} | {r['peak_memory_gib']:.2f} GiB |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["soda-tiny", "soda-nmr-32"])
    parser.add_argument("--batch", type=int, default=32, help="training batch size")
    parser.add_argument("--sample-batch", type=int, default=8, help="images per sampling call")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="autocast precision (default: bf16 on a GPU, fp32 on CPU)")
    parser.add_argument("--options", nargs="+", default=["none"], choices=OPTIONS, help="speed options, a row each")
    for component in ("encoder", "unet"):
        parser.add_argument(f"--{component}", type=json.loads, default={},
                            help=f"JSON object of {component} config overrides, as train_soda.py takes them")
    parser.add_argument("--json", help="also write the rows, the measured peak and the table to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = matmul_peak_tflops(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"torch {torch.__version__}, {name}; dense {precision} matmul peak measured here: {peak:.2f} TFLOP/s; "
             f"OpenMP's waiting: {THREAD_SETTINGS}", *TABLE_HEADER]
    print("\n".join(lines), flush=True)
    result = {"torch": torch.__version__, "device": name, "thread_settings": THREAD_SETTINGS, "precision": precision,
              "batch": args.batch,
              "sample_batch": args.sample_batch, "matmul_peak_tflops": peak, "rows": [], "table": lines}

    def write_json():  # after every row too: a run stopped early keeps the rows it measured
        if args.json:
            with open(args.json, "w") as file:
                json.dump(result, file, indent=2)

    write_json()
    for preset in args.presets:
        for option in args.options:
            try:
                r = bench_preset(preset, args.batch, args.steps, args.sample_batch, device, precision, option,
                                 encoder=args.encoder, unet=args.unet)
                r["percent_of_peak"] = 100 * r["train_tflops_per_s"] / peak
                lines.append(table_row(r))
            except Exception as error:  # one option failing (a compiler error, say) leaves the other rows
                r = {"preset": preset, "option": option, "error": f"{type(error).__name__}: {error}"}
                lines.append(f"| {preset} | {option} | failed: {r['error'][:200]} |")
            result["rows"].append(r)
            print(lines[-1], flush=True)
            write_json()


if __name__ == "__main__":
    main()
