"""Batches: what a data split yields and how items are collated (with padded report token states)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vkd_pyro.data.text_store import TokenStates
from vkd_pyro.encoders.text import pad_token_states


@dataclass
class Batch:
    """A mini-batch: images (B,1,H,W) in [0,1], labels (B,C) in {0,1}, optional report token states
    (B,T,H) with their mask (B,T), an optional label mask (B,C) and the dataset indices (B,)."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    token_states: Optional[torch.Tensor] = None
    token_mask: Optional[torch.Tensor] = None
    label_mask: Optional[torch.Tensor] = None

    @property
    def size(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device, non_blocking=True) for k, v in moved.items() if v is not None})

    def pin_memory(self) -> "Batch":
        """The batch in page-locked memory (DataLoader(pin_memory=True) calls this), for async copies."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.pin_memory() for k, v in tensors.items() if v is not None})


class PairedSplit(Dataset):
    """One split of a dataset: its records' image, labels and (when given) frozen report states.

    `base[i]` is a torchxrayvision-style dict with "img" (1,H,W) and "lab" (C,); `token_states`, when
    given, is a `TokenStates` view of the text feature store over all records of `base`: item i is
    the frozen encoder's (n_tokens, H) output for record i's report, read from the store's file
    when the item is asked for (no split ever holds all states in memory).
    """

    def __init__(self, base: Dataset, indices: Sequence[int], token_states: Optional[TokenStates] = None):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        if token_states is not None and not isinstance(token_states, TokenStates):
            raise TypeError("PairedSplit: token_states must be a TokenStates view of a text feature store")
        self.token_states = token_states

    def __len__(self) -> int:
        return len(self.indices)

    def token_lengths(self) -> Optional[list[int]]:
        """The report length (tokens) of each record of the split, from the store's index, or None without reports."""
        if self.token_states is None:
            return None
        return self.token_states.lengths[self.indices].tolist()

    def __getitem__(self, i: int) -> dict:
        idx = int(self.indices[i])
        item = dict(self.base[idx])
        if self.token_states is not None:
            item["token_states"] = self.token_states[idx]
        return item


def collate(items: Sequence[dict]) -> Batch:
    """Stack records into a :class:`Batch`; report states are zero-padded to the longest."""
    images = torch.stack([torch.as_tensor(it["img"], dtype=torch.float32) for it in items])
    labels = torch.stack([torch.as_tensor(it["lab"], dtype=torch.float32) for it in items])
    index = torch.tensor([int(it["idx"]) for it in items])
    label_mask = None
    if "lab_mask" in items[0]:
        label_mask = torch.stack([torch.as_tensor(it["lab_mask"], dtype=torch.float32) for it in items])
    token_states = token_mask = None
    if "token_states" in items[0]:
        token_states, token_mask = pad_token_states([it["token_states"] for it in items])
    return Batch(images=images, labels=labels, index=index, token_states=token_states,
                 token_mask=token_mask, label_mask=label_mask)


class LengthBucketSampler(Sampler):
    """Shuffled mini-batches of records of similar report length, so that padding stays small.

    Each epoch: a random permutation (from `generator`), cut into pools of `pool` batches; each pool
    is sorted by length and cut into batches; the batches are then shuffled. Every record appears
    exactly once an epoch; the last batch of a pool may be smaller.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator, pool: int = 32):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.generator = generator
        self.pool = pool

    def _batches(self) -> list[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).numpy()
        batches = []
        step = self.batch_size * self.pool
        for start in range(0, len(order), step):
            chunk = order[start:start + step]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        shuffle = torch.randperm(len(batches), generator=self.generator).tolist()
        return [batches[i] for i in shuffle]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        step = self.batch_size * self.pool
        full, rest = divmod(len(self.lengths), step)
        return full * self.pool + -(-rest // self.batch_size)
