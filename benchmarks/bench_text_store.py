"""The text feature store at MIMIC-CXR-like sizes: write speed, and a fresh reader's memory and batch rate.

For each size N: synthetic token states (lengths ~ Gamma(3, 33.3) rounded, clipped to [2, 256]:
mean ~100, max 256; width --width) are written into a new store in a temporary folder, in chunks of
--chunk records, through TextFeatureStore.append (the path encoding takes: array append + fsync +
atomic index commit). A fresh Python process then opens the store, takes a TokenStates view over
all records (as PairedSplit does) and reads --batches random batches of --batch-size records,
padding each with pad_token_states (as collate does); its own peak RSS (getrusage ru_maxrss)
is reported. Each size prints one line:

    reports=N peak_rss_mb=X write_mb_s=Y read_batches_s=Z

Record i's states are all equal to i % 2048, and the reader checks that every batch it reads is.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vkd_pyro.data.text_store import TextFeatureStore, entry_key, store_folder  # noqa: E402

IDENTITY, MAX_TOKENS = "synthetic-bench", 256


def synthetic_lengths(n: int, seed: int = 0) -> np.ndarray:
    """MIMIC-like report lengths in tokens: Gamma(3, 33.3) (mean 100), rounded, clipped to [2, 256]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.gamma(3.0, 100.0 / 3.0, n)), 2, MAX_TOKENS).astype(np.int64)


def write_store(parent: Path, n: int, width: int, chunk: int) -> tuple[Path, float, int]:
    """Write n synthetic records; returns (store folder, seconds spent in append, bytes of states)."""
    lengths = synthetic_lengths(n)
    folder = store_folder(parent, IDENTITY, MAX_TOKENS)
    store = TextFeatureStore(folder, IDENTITY, MAX_TOKENS, width)
    seconds = 0.0
    for at in range(0, n, chunk):
        ids = np.arange(at, min(n, at + chunk))
        block = np.empty((int(lengths[ids].sum()), width), dtype=np.float16)
        block[:] = np.repeat((ids % 2048).astype(np.float16), lengths[ids])[:, None]
        states = np.split(block, np.cumsum(lengths[ids])[:-1])
        keys = [entry_key(IDENTITY, MAX_TOKENS, f"report {i}") for i in ids]
        started = time.perf_counter()
        store.append(keys, states)
        seconds += time.perf_counter() - started
    return folder, seconds, int(lengths.sum()) * width * 2


def read_main(folder: str, width: int, batches: int, batch_size: int, threads: int) -> None:
    """The reader process: open the store, read random batches, print a JSON line of its figures."""
    import torch

    from vkd_pyro.encoders.text import pad_token_states

    torch.set_num_threads(threads)
    store = TextFeatureStore(folder, IDENTITY, MAX_TOKENS, width)
    view = store.view(np.arange(len(store)))  # the keys are "report i" in order: entry i is record i
    rng = np.random.default_rng(1)
    picks = rng.integers(0, len(view), size=(batches + 5, batch_size))
    for warm in picks[:5]:
        pad_token_states([view[int(i)] for i in warm])
    started = time.perf_counter()
    for batch in picks[5:]:
        padded, mask = pad_token_states([view[int(i)] for i in batch])
        first = torch.from_numpy((batch % 2048).astype(np.float32))
        if not torch.equal(padded[:, 0, 0], first) or not torch.equal(mask.sum(1), torch.from_numpy(view.lengths[batch]).long()):
            raise SystemExit("reader: a batch does not hold the records asked for")
    rate = batches / (time.perf_counter() - started)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"read_batches_s": rate, "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", default="10000,50000,200000", help="comma-separated store sizes")
    parser.add_argument("--width", type=int, default=768, help="token state width (ClinicalBERT: 768)")
    parser.add_argument("--batches", type=int, default=200, help="random batches the reader times")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=2048, help="records per committed write chunk")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the reader")
    parser.add_argument("--dir", default=None, help="parent of the temporary store folders (default: $TMPDIR)")
    parser.add_argument("--read", default=None, help=argparse.SUPPRESS)  # internal: be the reader of this store
    args = parser.parse_args()
    if args.read:
        read_main(args.read, args.width, args.batches, args.batch_size, args.threads)
        return
    sizes = [int(n) for n in args.reports.split(",") if n.strip()]
    print(f"# width {args.width}, float16, lengths mean {synthetic_lengths(max(sizes)).mean():.1f} max "
          f"{synthetic_lengths(max(sizes)).max()}, chunks of {args.chunk}; reader: {args.batches} random batches "
          f"of {args.batch_size}, {args.threads} thread(s), fresh process", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="bench_text_store_", dir=args.dir) as parent:
            folder, seconds, nbytes = write_store(Path(parent), n, args.width, args.chunk)
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--read", str(folder),
                                  "--width", str(args.width), "--batches", str(args.batches),
                                  "--batch-size", str(args.batch_size), "--threads", str(args.threads)],
                                 env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"reader failed: {out.stderr.strip().splitlines()[-1:]}")
            read = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"reports={n} peak_rss_mb={read['peak_rss_mb']:.1f} write_mb_s={nbytes / 1e6 / seconds:.1f} "
              f"read_batches_s={read['read_batches_s']:.1f}", flush=True)


if __name__ == "__main__":
    main()
