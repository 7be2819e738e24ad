"""Several processes: the batch plan, and 2 gloo processes on the CPU against one process.

The two-process run goes through the same code path as `torchrun --nproc_per_node=2 -m vkd_pyro
train ...` (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment; vkd_pyro.training.distributed joins the
group), started here with torch.multiprocessing.

Why the comparison is exact: DDP splits every global batch between the processes. The gradient
of the global batch's mean loss is then the same, but two things differ from one process in any
DDP run: each process draws its own Monte Carlo noise, and batch norm normalises with the
statistics of its share (SyncBatchNorm, `train.sync_batchnorm`, exists for GPUs only). For this
test both are taken out in the parent and in the workers alike: Gaussian draws return their mean
and the CNN's batch norm is the identity. What remains is deterministic, so one process and two
must agree to float rounding: losses, validation AUCs (early stopping), weights, test metrics.
"""

import json
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from tests.tiny_runs import tiny_overrides
from vkd_pyro.config import load_config
from vkd_pyro.data.sampling import ResumableBatchSampler, drop_undersized, epoch_batches, shard
from vkd_pyro.objectives import objective_for
from vkd_pyro.training.checkpoint import load_resume_state
from vkd_pyro.training.loop import fit

TINY = tiny_overrides({"model.dropout": 0, "text_encoder.dropout": 0, "image_encoder.width": 4,
                       "image_encoder.out_features": 16, "text_encoder.block_heads": None, "text_encoder.block_ffn": None,
                       "train.batch_size": 8, "train.max_epochs": 2, "train.patience": 5})


# --------------------------------------------------------------------------- the batch plan


def test_epoch_batches_depend_on_seed_and_epoch_only():
    lengths = list(np.random.default_rng(0).integers(5, 90, 103))
    for with_lengths in (None, lengths):
        first = epoch_batches(103, 8, seed=3, epoch=2, lengths=with_lengths)
        assert first == epoch_batches(103, 8, seed=3, epoch=2, lengths=with_lengths)
        assert sorted(i for b in first for i in b) == list(range(103))
        assert all(len(b) <= 8 for b in first)
        assert first != epoch_batches(103, 8, seed=3, epoch=3, lengths=with_lengths)
        assert first != epoch_batches(103, 8, seed=4, epoch=2, lengths=with_lengths)


def test_shards_partition_each_global_batch():
    batch = list(range(100, 111))  # 11 records over 3 processes: 4, 4, 3
    parts = [shard(batch, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 3]
    assert sum(parts, []) == batch
    batches = [[0, 1, 2, 3], [4, 5, 6], [7]]
    kept, dropped = drop_undersized(batches, 2)
    assert kept == [[0, 1, 2, 3], [4, 5, 6]] and dropped == 1
    sampler = ResumableBatchSampler(kept, start=1, rank=1, world_size=2)
    assert len(sampler) == 1 and list(sampler) == [[6]]
    assert [b for r in range(2) for b in ResumableBatchSampler(kept, 0, r, 2)] == [[0, 1], [4, 5], [2, 3], [6]]


# --------------------------------------------------------------------------- 2 processes against 1


class NoNorm(nn.Identity):
    """Stands in for BatchNorm2d(channels)."""

    def __init__(self, *args, **kwargs):
        super().__init__()


def mean_rsample(self, sample_shape=torch.Size()):
    return self.loc.expand(self._extended_shape(sample_shape))


def mean_sample(self, sample_shape=torch.Size()):
    with torch.no_grad():
        return mean_rsample(self, sample_shape)


DETERMINISTIC = [(torch.distributions.Normal, "rsample", mean_rsample),
                 (torch.distributions.Normal, "sample", mean_sample), (nn, "BatchNorm2d", NoNorm)]


def _worker(rank: int, world: int, port: int, jobs: list) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    for owner, name, value in DETERMINISTIC:
        setattr(owner, name, value)
    for overrides, out in jobs:
        fit(load_config(None, overrides), out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def numbers(run) -> tuple:
    """(history rows without seconds as floats, test metrics without timings, final weights)."""
    rows = (run / "history.csv").read_text().splitlines()[1:]
    history = np.array([[float(x) for x in row.split(",")[:-1]] for row in rows])
    metrics = json.loads((run / "metrics.json").read_text())
    return history, metrics, load_resume_state(run)["module"]


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cache = tmp_path / "cache"
    # Batches of 7 are split 4 + 3: the shares' losses must be weighted by their size.
    jobs = {objective: TINY + [f"cache_dir={cache}", f"inference.objective={objective}", "train.batch_size=7"]
            for objective in ("vkd", "no_mi")}  # no_mi: DDP must find the guide unused at beta = 0
    for owner, name, value in DETERMINISTIC:
        monkeypatch.setattr(owner, name, value)
    for objective, overrides in jobs.items():  # one process (this one); also fills the cache
        fit(load_config(None, overrides), tmp_path / f"one-{objective}")
    monkeypatch.undo()

    mp.spawn(_worker, args=(2, free_port(), [(o, tmp_path / f"two-{k}") for k, o in jobs.items()]), nprocs=2,
             join=True)

    for objective in jobs:
        one_history, one_metrics, one_weights = numbers(tmp_path / f"one-{objective}")
        two_history, two_metrics, two_weights = numbers(tmp_path / f"two-{objective}")
        assert one_history.shape == two_history.shape == (2, 3 + len(objective_for(load_config(None, jobs[objective])).terms))
        np.testing.assert_allclose(two_history, one_history, rtol=1e-4, atol=1e-5)  # loss terms, beta, val AUC
        assert two_metrics["n_test"] == one_metrics["n_test"] and two_metrics["best_epoch"] == one_metrics["best_epoch"]
        assert two_metrics["macro_auc"] == pytest.approx(one_metrics["macro_auc"], abs=1e-6)
        assert two_metrics["micro_auc"] == pytest.approx(one_metrics["micro_auc"], abs=1e-6)
        assert two_metrics["auc"] == pytest.approx(one_metrics["auc"], abs=1e-6)
        assert one_weights.keys() == two_weights.keys()
        for key, value in one_weights.items():
            other = two_weights[key]
            if key.endswith("self_attn.in_proj_bias"):
                # The key bias (the middle third) has a zero gradient in exact arithmetic (softmax
                # ignores a shift common to all keys); Adam normalises its rounding noise to steps
                # of +-lr, whose signs differ between the two summation orders. Compared apart.
                width = value.numel() // 3
                assert (other[width:2 * width] - value[width:2 * width]).abs().max() <= 2 * 12 * 1e-3
                other, value = torch.cat([other[:width], other[2 * width:]]), torch.cat([value[:width], value[2 * width:]])
            torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-5, msg=key)


# --------------------------------------------------------------------------- rank 0 fills the caches


def _recording_worker(rank: int, world: int, port: int, overrides: list, out, events) -> None:
    """A DDP rank that notes (rank, event, time, detail) lines in `events` when it enters and leaves
    prepare_data, renders phantoms and encodes reports (each patched to note, then do the real work)."""
    import os
    import time

    import vkd_pyro.data.openi_phantom as phantom
    import vkd_pyro.training.loop as loop
    from vkd_pyro.data.text_store import TextFeatureStore

    def note(event, detail=""):
        with open(events, "a") as f:
            f.write(f"{rank} {event} {time.time():.6f} {detail}\n")

    def noting(name, real, detail=lambda *a, **k: ""):
        def call(*args, **kwargs):
            note(f"{name}-start", detail(*args, **kwargs))
            result = real(*args, **kwargs)
            note(f"{name}-end")
            return result
        return call

    loop.prepare_data = noting("prepare", loop.prepare_data)
    phantom.render_reports = noting("render", phantom.render_reports)
    TextFeatureStore._encode_missing = noting(
        "encode", TextFeatureStore._encode_missing, lambda store, encoder, missing, *a: f"{len(missing)} {store.array_path}")
    real_view = TextFeatureStore.view
    TextFeatureStore.view = lambda store, rows: (note("read", str(store.array_path)), real_view(store, rows))[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    fit(load_config(None, overrides), out)


def test_rank_0_renders_and_encodes_while_the_other_rank_waits_then_both_read_one_store(tmp_path):
    """torchrun on a first build: rank 0 renders the images and encodes every report into the text
    store while rank 1 waits at the barrier; rank 1 then renders nothing, encodes nothing and reads
    the same store file."""
    events = tmp_path / "events.txt"
    overrides = TINY + [f"cache_dir={tmp_path / 'empty-cache'}", "inference.objective=vkd"]
    mp.spawn(_recording_worker, args=(2, free_port(), overrides, tmp_path / "run", events), nprocs=2, join=True)

    lines = [line.split(" ", 3) for line in events.read_text().splitlines()]
    log = [(int(rank), event, float(at), detail.strip()) for rank, event, at, detail in lines]
    at = {(rank, event): time for rank, event, time, _ in log if event.endswith(("-start", "-end"))}
    encoded = [(rank, detail) for rank, event, _, detail in log if event == "encode-start"]
    assert [rank for rank, event, *_ in log if event == "render-start"] == [0]
    assert len(encoded) == 1 and encoded[0][0] == 0 and int(encoded[0][1].split()[0]) > 0  # rank 0, every report
    assert at[(0, "encode-end")] <= at[(0, "prepare-end")] <= at[(1, "prepare-start")]  # rank 1 waited
    reads = {rank: detail for rank, event, _, detail in log if event == "read"}
    store = encoded[0][1].split(" ", 1)[1]
    assert reads == {0: store, 1: store}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n_test"] > 0
