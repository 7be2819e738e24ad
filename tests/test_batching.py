"""Collation with padded report states read from the text feature store, and length-bucketed batches."""

import pytest
import torch

from vkd_pyro.data.batching import LengthBucketSampler, PairedSplit, collate
from vkd_pyro.data.text_store import TextFeatureStore, entry_key


class Records(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"idx": i, "img": torch.full((1, 4, 4), i / 10), "lab": torch.tensor([i % 2, 1.0])}


def states_of(tmp_path, n=10, width=3):
    """A store holding record i's states (i + 1, width), all equal to i, and its view over records 0..n-1."""
    store = TextFeatureStore(tmp_path / "store", "test", 16, width)
    keys = [entry_key("test", 16, f"report {i}") for i in range(n)]
    store.append(keys, [torch.ones(i + 1, width, dtype=torch.float16) * i for i in range(n)])
    return store.view(store.rows_of(keys))


def test_collate_pads_states_read_from_the_store_and_keeps_order(tmp_path):
    split = PairedSplit(Records(), [7, 2, 5], states_of(tmp_path))
    batch = collate([split[i] for i in range(3)])
    assert batch.images.shape == (3, 1, 4, 4) and batch.index.tolist() == [7, 2, 5]
    assert batch.token_states.shape == (3, 8, 3) and batch.token_states.dtype == torch.float16  # as stored
    assert batch.token_mask.sum(1).tolist() == [8, 3, 6]
    assert batch.token_states[1, :3].unique().tolist() == [2.0]  # record 2's states
    assert batch.token_states[1, 3:].abs().sum() == 0  # zero padding
    assert split.token_lengths() == [8, 3, 6]


def test_split_reads_states_per_item_and_lengths_from_the_index(tmp_path, monkeypatch):
    view = states_of(tmp_path)
    split = PairedSplit(Records(), [7, 2, 5], view)
    read = []
    original = type(view).__getitem__
    monkeypatch.setattr(type(view), "__getitem__", lambda self, i: read.append(i) or original(self, i))
    assert split.token_lengths() == [8, 3, 6] and read == []  # lengths need no states
    split[1]
    assert read == [2]  # one record's states, not the split's
    with pytest.raises(TypeError, match="TokenStates"):
        PairedSplit(Records(), [0], [torch.ones(1, 3)])


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
