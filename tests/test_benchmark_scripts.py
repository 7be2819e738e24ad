"""The benchmark scripts run (a step or two each, on the CPU) and print what they promise.

Timings are not checked: only that each script works end to end and reports its figures.
"""

import re
import sys

import pytest
import torch

from benchmarks import bench_particles, bench_svi, gpu_smoke


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def run(monkeypatch, capsys, module, *argv) -> str:
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    module.main()
    return capsys.readouterr().out


def test_gpu_smoke_trains_the_paper_configuration_on_the_cpu(monkeypatch, capsys):
    out = run(monkeypatch, capsys, gpu_smoke, "--device", "cpu", "--steps", "1", "--warmup", "0",
              "--batch-size", "2", "--image-size", "32", "--tokens", "8")
    assert "DenseNet-121 at 32, z 512" in out and "text block width 384" in out
    rates = re.findall(r"amp (none|bf16):.* ([\d.]+) images/s", out)
    assert [amp for amp, _ in rates] == ["none", "bf16"] and all(float(r) > 0 for _, r in rates)
    assert "bf16 speed-up" in out


def test_svi_and_particle_benchmarks_print_their_tables(monkeypatch, capsys):
    out = run(monkeypatch, capsys, bench_svi, "--rounds", "1", "--per-round", "1", "--warmup", "0",
              "--particles", "2", "--threads", "1")
    row = out.strip().splitlines()[-1].split()
    assert row[0] == "2" and len(row) == 6 and all(float(x) > 0 for x in row[1:])
    out = run(monkeypatch, capsys, bench_svi, "--rounds", "1", "--per-round", "1", "--warmup", "0",
              "--particles", "1", "--threads", "1", "--unfused")
    row = out.strip().splitlines()[-1].split()
    assert "ratio unfused" in out and len(row) == 9 and all(float(x) > 0 for x in row[1:])
    out = run(monkeypatch, capsys, bench_particles, "--rounds", "1", "--per-round", "1", "--warmup", "0",
              "--particles", "1", "2", "--threads", "1")
    rows = [line.split() for line in out.strip().splitlines()[-2:]]
    assert [r[0] for r in rows] == ["1", "2"] and all(len(r) == 7 for r in rows)


def test_text_store_benchmark_prints_one_line_per_size(monkeypatch, capsys):
    from benchmarks import bench_text_store

    out = run(monkeypatch, capsys, bench_text_store, "--reports", "40,90", "--width", "8", "--batches", "3",
              "--batch-size", "4", "--chunk", "32")
    lines = [line for line in out.strip().splitlines() if not line.startswith("#")]
    pattern = r"reports=(\d+) peak_rss_mb=([\d.]+) write_mb_s=([\d.]+) read_batches_s=([\d.]+)"
    matches = [re.fullmatch(pattern, line) for line in lines]
    assert all(matches) and [int(m.group(1)) for m in matches] == [40, 90]
    assert all(float(x) > 0 for m in matches for x in m.groups()[1:])
