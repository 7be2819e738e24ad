"""Does loading starve the model? Images per second of the data loader beside images per second of a
DenseNet-121 training step, on this machine.

Writes `--images` synthetic radiographs at the real releases' sizes (MIMIC-CXR-JPG JPEGs of
2544 x 3056 pixels, ChestX-ray14 PNGs of 1024 x 1024) into a temporary folder, then measures:

- cold decode: `vkd_pyro.data.image_cache.load_or_decode` decoding and resizing the files to
  `--size` (what the first build of a dataset does once), in 1 process and in `--workers`;
- cached loader: a `vkd_pyro.data.records.XRayDataset` over the cache (a memmap) through a
  `DataLoader` with `vkd_pyro.data.batching.collate`, batches of `--batch`, with 0 and `--workers` workers
  (what every epoch does);
- the training step: DenseNet-121 (vkd_pyro.encoders.image, 1 grey channel) plus a linear head,
  forward + backward + Adam step on a batch of `--batch` at `--size` px (the paper's backbone).

Run: .venv/bin/python benchmarks/bench_loader.py [--images 48] [--size 224] [--batch 16] [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vkd_pyro.data.batching import collate
from vkd_pyro.data.image_cache import load_or_decode
from vkd_pyro.data.phantom import render_phantom
from vkd_pyro.data.records import BadRecords, XRayDataset


def write_images(folder: Path, count: int) -> dict[str, list[str]]:
    """`count` JPEGs at MIMIC-CXR-JPG's size and `count` PNGs at ChestX-ray14's, with film-like noise."""
    rng = np.random.default_rng(0)
    out = {"jpg 2544x3056 (MIMIC-CXR-JPG)": [], "png 1024x1024 (ChestX-ray14)": []}
    base = [render_phantom(f"bench{i}", [], size=512) for i in range(4)]
    for i in range(count):
        image = Image.fromarray(base[i % 4])
        for kind, (w, h), suffix in (("jpg 2544x3056 (MIMIC-CXR-JPG)", (2544, 3056), "jpg"),
                                     ("png 1024x1024 (ChestX-ray14)", (1024, 1024), "png")):
            big = np.asarray(image.resize((w, h), Image.BICUBIC), dtype=np.int16)
            big = np.clip(big + rng.normal(0, 4, big.shape), 0, 255).astype(np.uint8)
            path = folder / f"{i}.{suffix}"
            Image.fromarray(big).save(path, **({"quality": 95} if suffix == "jpg" else {}))
            out[kind].append(str(path))
    return out


def cold_decode(paths: list[str], size: int, cache: Path, workers: int) -> float:
    """Images per second of decoding + resizing `paths` into a fresh cache."""
    started = time.perf_counter()
    load_or_decode(paths, size, cache, f"bench-w{workers}-{Path(paths[0]).suffix[1:]}", lambda *a: None,
                   workers=workers)
    return len(paths) / (time.perf_counter() - started)


def cached_loader(paths: list[str], size: int, cache: Path, batch: int, workers: int, epochs: int = 4) -> float:
    """Images per second of a DataLoader over an XRayDataset whose images are already cached."""
    records = pd.DataFrame({"record": [str(i) for i in range(len(paths))], "path": paths,
                            "group": [str(i) for i in range(len(paths))], "view": "PA"})
    dataset = XRayDataset("bench-cached", records, np.zeros((len(paths), 14), np.float32), None, None, size,
                          cache, BadRecords("error"))
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, collate_fn=collate, num_workers=workers,
                        persistent_workers=workers > 0)
    for _ in loader:  # warm-up: worker start-up and page cache
        break
    started, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for b in loader:
            seen += b.size
    return seen / (time.perf_counter() - started)


def train_step(size: int, batch: int, steps: int) -> float:
    """Images per second of DenseNet-121 forward + backward + Adam on (batch, 1, size, size)."""
    from vkd_pyro.encoders.image import build_image_encoder

    encoder = build_image_encoder("densenet121", "none")
    head = torch.nn.Linear(encoder.out_features, 14)
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-4)
    images = torch.rand(batch, 1, size, size)
    labels = (torch.rand(batch, 14) < 0.2).float()

    def step():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(encoder(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - started)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48, help="files of each kind (default 48)")
    parser.add_argument("--size", type=int, default=224, help="decoded size in pixels (default 224, the paper's)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--steps", type=int, default=3, help="timed DenseNet-121 steps (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"cuda {'yes' if torch.cuda.is_available() else 'no'}; load average {os.getloadavg()[0]:.1f} "
          f"(other processes on these cores slow every figure below)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "files", Path(tmp) / "cache"
        folder.mkdir()
        started = time.perf_counter()
        files = write_images(folder, args.images)
        print(f"wrote {2 * args.images} files in {time.perf_counter() - started:.0f} s", flush=True)
        rows = []
        for kind, paths in files.items():
            for workers in (0, args.workers):
                rate = cold_decode(paths, args.size, cache, workers)
                rows.append((f"cold decode, {kind}, {max(workers, 1)} process(es)", rate))
                print(f"  {rows[-1][0]}: {rate:.1f} images/s", flush=True)
        paths = files["jpg 2544x3056 (MIMIC-CXR-JPG)"]
        for workers in (0, args.workers):
            rate = cached_loader(paths, args.size, cache, args.batch, workers)
            rows.append((f"cached loader (memmap), batch {args.batch}, {workers} workers", rate))
            print(f"  {rows[-1][0]}: {rate:.0f} images/s", flush=True)
        model = train_step(args.size, args.batch, args.steps)
        print(f"  DenseNet-121 training step, batch {args.batch} at {args.size} px: {model:.2f} images/s", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    width = max(len(name) for name, _ in rows) + 2
    print(f"\n{'':{width}}{'loader img/s':>14}{'model img/s':>14}{'loader/model':>14}")
    for name, rate in rows:
        print(f"{name:{width}}{rate:14.1f}{model:14.2f}{rate / model:13.1f}x")
    print("\nloader/model > 1: the loader outruns a training step (the cached loader is what every epoch uses; "
          "cold decode happens once, when the dataset is first built).")


if __name__ == "__main__":
    sys.exit(main())
