"""Collation with padded report states, and length-bucketed batches."""

import torch

from vkd_pyro.data.batching import LengthBucketSampler, PairedSplit, collate


class Records(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"idx": i, "img": torch.full((1, 4, 4), i / 10), "lab": torch.tensor([i % 2, 1.0])}


def test_collate_pads_states_and_keeps_order():
    states = [torch.ones(n + 1, 3, dtype=torch.float16) * n for n in range(10)]
    split = PairedSplit(Records(), [7, 2, 5], states)
    batch = collate([split[i] for i in range(3)])
    assert batch.images.shape == (3, 1, 4, 4) and batch.index.tolist() == [7, 2, 5]
    assert batch.token_states.shape == (3, 8, 3) and batch.token_states.dtype == torch.float32
    assert batch.token_mask.sum(1).tolist() == [8, 3, 6]
    assert batch.token_states[1, 3:].abs().sum() == 0  # zero padding
    assert split.token_lengths() == [8, 3, 6]


def test_length_buckets_cover_every_record_once_and_group_lengths():
    lengths = torch.randint(5, 200, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = LengthBucketSampler(lengths, 16, torch.Generator().manual_seed(1), pool=8)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    random_batches = torch.randperm(1000, generator=torch.Generator().manual_seed(2)).split(16)
    padded_random = sum(len(b) * max(lengths[i] for i in b.tolist()) for b in random_batches)
    assert padded < 0.75 * padded_random
    again = list(LengthBucketSampler(lengths, 16, torch.Generator().manual_seed(1), pool=8))
    assert again == batches  # deterministic for a seed
