"""Data-layer throughput: synthetic generation and random access from a folder, a zip and Arrow.

    python benchmarks/bench_data.py [--objects-per-category 10] [--items 1500] [--workdir DIR]

Prints objects/s for rendering the synthetic dataset (in this process and with 2 worker processes),
the Arrow conversion time, then NMRDataset items/s, in random order, for each storage at 32 and 64 px,
read directly (0 workers) and through a DataLoader with 2 workers (batches of 32, timed after the
first batch so that worker start-up is left out).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from soda_diffusers.data import NMRDataset, convert_to_arrow, make_synthetic_nmr


def generation_rate(out: Path, objects_per_category: int, num_workers: int, zip: bool = False) -> float:
    start = time.perf_counter()
    make_synthetic_nmr(out, objects_per_category, seed=0, zip=zip, num_workers=num_workers)
    return 13 * objects_per_category / (time.perf_counter() - start)


def direct_rate(dataset: NMRDataset, items: int) -> float:
    order = np.random.default_rng(0).permutation(len(dataset))
    order = np.resize(order, items)
    start = time.perf_counter()
    for idx in order:
        dataset[int(idx)]
    return items / (time.perf_counter() - start)


def loader_rate(dataset: NMRDataset, items: int, num_workers: int) -> float:
    generator = torch.Generator().manual_seed(0)
    sampler = torch.utils.data.RandomSampler(
        dataset, replacement=True, num_samples=items + 32, generator=generator
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, sampler=sampler, num_workers=num_workers)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    count = sum(len(batch["label"]) for batch in iterator)
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--objects-per-category", type=int, default=10)
    parser.add_argument("--items", type=int, default=1500, help="items read per measurement")
    parser.add_argument(
        "--workdir", default=None, help="where to write the data (default: a temporary folder)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        root = Path(workdir)
        n = args.objects_per_category
        print(f"synthetic generation, {13 * n} objects (24 views each, 64 px, 2x2 supersampling):")
        print(f"  folder, 1 process    {generation_rate(root / 'folder', n, 0):8.1f} objects/s")
        print(
            f"  zip,    1 process    {generation_rate(root / 'NMR_Dataset', n, 0, zip=True):8.1f} objects/s"
        )
        print(f"  folder, 2 processes  {generation_rate(root / 'folder-2', n, 2):8.1f} objects/s")
        start = time.perf_counter()
        convert_to_arrow(root / "folder", root / "arrow")
        print(
            f"Arrow conversion: {time.perf_counter() - start:.1f} s ({13 * n / (time.perf_counter() - start):.1f} objects/s)"
        )
        stores = {"folder": root / "folder", "zip": root / "NMR_Dataset.zip", "arrow": root / "arrow"}
        print(f"\nNMRDataset random access, items/s ({args.items} items per figure):")
        print(f"  {'storage':8s} {'size':>4s} {'0 workers':>10s} {'2 workers':>10s}")
        rates = {}
        for name, path in stores.items():
            for size in (32, 64):
                dataset = NMRDataset(path, image_size=size)
                direct = direct_rate(dataset, args.items)
                workers = loader_rate(NMRDataset(path, image_size=size), args.items, num_workers=2)
                rates[name, size] = direct
                print(f"  {name:8s} {size:4d} {direct:10.0f} {workers:10.0f}")
        for size in (32, 64):
            ratio = rates["arrow", size] / rates["folder", size]
            print(f"Arrow / folder at {size} px, 0 workers: {ratio:.1f}x")


if __name__ == "__main__":
    main()
