"""The order of training batches: a pure function of (seed, epoch), resumable and shardable.

An epoch's *global* batches (lists of split positions) depend only on the training seed, the
epoch number and the batch size, never on a generator carried from epoch to epoch. This makes
three things simple:

- resuming mid-epoch: the batches of that epoch are recomputed and the first `start` skipped
  (their records are not even loaded);
- several processes: every process computes the same global batches and takes its own share of
  each (:func:`shard`), so K processes see exactly the examples one process would see in one
  global batch, and the KL schedule counts the same T iterations per epoch;
- no draw from the global torch RNG (which the model's sampling uses) for the batch order.

With report lengths, an epoch's batches are those of
:class:`vkd_pyro.data.batching.LengthBucketSampler` (batches of similar length) drawn from a generator
seeded by (seed, epoch); without, a random permutation cut into batches.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.utils.data import Sampler

from vkd_pyro.data.batching import LengthBucketSampler

# Mixes the epoch into the seed (a large odd constant keeps (seed, epoch) pairs apart).
_EPOCH_STRIDE = 1_000_003


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded by (seed, epoch): the same in every process and after a resume."""
    return torch.Generator().manual_seed(int(seed) * _EPOCH_STRIDE + int(epoch))


def epoch_batches(num_records: int, batch_size: int, seed: int, epoch: int,
                  lengths: Optional[Sequence[int]] = None) -> list[list[int]]:
    """The global batches of `epoch` (1-based): every record once, in batches of <= batch_size.

    With `lengths` (report tokens per record), batched by similar length (LengthBucketSampler);
    otherwise a uniformly random permutation cut into consecutive batches.
    """
    generator = epoch_generator(seed, epoch)
    if lengths is not None:
        if len(lengths) != num_records:
            raise ValueError(f"{len(lengths)} lengths for {num_records} records")
        return [list(b) for b in LengthBucketSampler(lengths, batch_size, generator)]
    order = torch.randperm(num_records, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, num_records, batch_size)]


def shard(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Process `rank`'s share of a global batch: contiguous, sizes differing by at most one."""
    base, extra = divmod(len(batch), world_size)
    start = rank * base + min(rank, extra)
    return list(batch[start:start + base + (1 if rank < extra else 0)])


class ResumableBatchSampler(Sampler):
    """Batch sampler over precomputed global batches: from batch `start` on, this process's share.

    `len()` is the number of batches still to come; each yields `shard(batch, rank, world_size)`.
    A global batch smaller than world_size would leave a process without examples: such batches
    must be removed beforehand (:func:`drop_undersized`).
    """

    def __init__(self, batches: Sequence[Sequence[int]], start: int = 0, rank: int = 0, world_size: int = 1):
        if not 0 <= start <= len(batches):
            raise ValueError(f"start {start} outside 0..{len(batches)}")
        self.batches = batches
        self.start = start
        self.rank = rank
        self.world_size = world_size

    def __iter__(self):
        for batch in self.batches[self.start:]:
            yield shard(batch, self.rank, self.world_size)

    def __len__(self) -> int:
        return len(self.batches) - self.start


def drop_undersized(batches: list[list[int]], world_size: int) -> tuple[list[list[int]], int]:
    """The batches with at least `world_size` records, and how many records were left out."""
    kept = [b for b in batches if len(b) >= world_size]
    return kept, sum(len(b) for b in batches if len(b) < world_size)
