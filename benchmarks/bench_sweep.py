"""Does a sweep on N local workers beat one run after another? Wall seconds of the same grid with
`--jobs 1` and `--jobs N` on this machine.

The grid: the demo config at a small size (tests/tiny_runs.py, with `--reports` reports, `--epochs`
epochs and no early stopping, so that every variant does the same work) over
inference.prior_samples = 1, 2 and `--seeds` seeds: 2 x seeds runs. The report features are cached
once before timing, so no variant pays for them. Each variant trains the whole grid into a fresh
folder through `vkd_pyro.analysis.sweep.run_sweep` with `LocalLauncher(jobs)`: jobs = 1 trains in
this process with its threads as they are (torch's default: one per core), jobs = N in N worker
processes with max(1, cores // N) threads each (the cores' threads shared, not multiplied). With
`--repeats R` the variants alternate R times; the medians are printed with their ratio.

Run: .venv/bin/python benchmarks/bench_sweep.py [--reports 400] [--epochs 60] [--seeds 2] [--jobs 1 2] [--repeats 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from tests.tiny_runs import tiny_overrides  # noqa: E402
from vkd_pyro.analysis.grid import parse_grid  # noqa: E402
from vkd_pyro.analysis.launch import LocalLauncher, available_cores  # noqa: E402
from vkd_pyro.analysis.sweep import run_sweep  # noqa: E402
from vkd_pyro.config import load_config  # noqa: E402
from vkd_pyro.data.prepare import prepare_data  # noqa: E402

CONFIG = "configs/demo.yaml"
GRID = ["inference.prior_samples=1,2"]


def time_sweep(jobs: int, folder: Path, overrides: list[str], seeds: int) -> float:
    """Wall seconds of the whole grid (training, the sweep's test evaluation, its tables) with `jobs`."""
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the runs' status lines (jobs = 1 logs here)
        result = run_sweep(CONFIG, parse_grid(GRID), seeds, folder, overrides, progress=False,
                           launcher=LocalLauncher(jobs))
    seconds = time.perf_counter() - started
    if result.failed or len(result.ran) != 2 * seeds:
        raise SystemExit(f"jobs {jobs}: {len(result.ran)} runs trained, failed: {result.failed}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=400, help="data.max_reports (default 400)")
    parser.add_argument("--epochs", type=int, default=60, help="train.max_epochs, no early stopping (default 60)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per grid point (default 2: 4 runs)")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="the variants (default 1 2)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds (default 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_sweep") as tmp:
        tmp = Path(tmp)
        overrides = tiny_overrides({"data.max_reports": args.reports, "train.max_epochs": args.epochs,
                                    "train.patience": args.epochs + 1}) + [f"cache_dir={tmp / 'cache'}"]
        with contextlib.redirect_stdout(io.StringIO()):
            prepare_data(load_config(CONFIG, overrides), with_reports=True)  # the report features, cached before timing
        print(machine())
        print(f"grid: {GRID[0]} x {args.seeds} seeds = {2 * args.seeds} runs of {CONFIG} with {args.reports} "
              f"reports, {args.epochs} epochs; {available_cores()} cores, torch threads in this process "
              f"{torch.get_num_threads()}")
        seconds: dict[int, list[float]] = {jobs: [] for jobs in args.jobs}
        for repeat in range(args.repeats):
            for jobs in args.jobs:
                seconds[jobs].append(time_sweep(jobs, tmp / f"r{repeat}-j{jobs}", overrides, args.seeds))
                print(f"round {repeat + 1}: --jobs {jobs}: {seconds[jobs][-1]:.1f} s", flush=True)
        base = statistics.median(seconds[args.jobs[0]])
        print(f"{'jobs':>4} {'threads each':>12} {'wall s':>8} {'ratio':>6}")
        for jobs in args.jobs:
            median = statistics.median(seconds[jobs])
            threads = torch.get_num_threads() if jobs == 1 else LocalLauncher(jobs).threads
            print(f"{jobs:>4} {threads:>12} {median:>8.1f} {median / base:>6.3f}")


if __name__ == "__main__":
    main()
