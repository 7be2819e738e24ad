"""The one place that turns a config into data: the dataset, its splits and the frozen report features.

`prepare_data(config)` builds the dataset `data.name` names, splits it by group (or by its official
split) and applies the training fraction, label noise and report control
(`vkd_pyro.data.training_split`), and, for objectives that read the reports, runs the frozen text encoder once over every
report (stored on disk, `vkd_pyro.data.text_store`). The result pairs each split's records with their
token states (`vkd_pyro.data.batching.PairedSplit`) and carries one line per step for the log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from vkd_pyro.config import Config
from vkd_pyro.data.batching import PairedSplit
from vkd_pyro.data.card import dataset_card
from vkd_pyro.data.registry import build_dataset
from vkd_pyro.data.text_store import TextFeatureStore
from vkd_pyro.data.training_split import training_splits
from vkd_pyro.encoders.text import FrozenTextEncoder


@dataclass
class PreparedData:
    """A dataset, its train/validation/test splits and the frozen text encoder's block sizes."""

    dataset: object
    splits: dict
    dims: Optional[dict] = None  # text_dims of the frozen encoder; None without reports
    notes: list = field(default_factory=list)  # one line per step, for the log
    card: dict = field(default_factory=dict)  # the dataset card (`vkd_pyro.data.card.dataset_card`)
    text_encoder: Optional[dict] = None  # {"name", "path", "identity", "max_tokens"}; None without reports


def text_dims(encoder: FrozenTextEncoder) -> dict:
    """The sizes of one Transformer block of the frozen text encoder, for the trainable TextHead."""
    return {"hidden_size": encoder.hidden_size, "num_heads": encoder.num_attention_heads,
            "intermediate_size": encoder.intermediate_size}


def prepare_data(config: Config, with_reports: bool, device: Optional[torch.device] = None) -> PreparedData:
    """Dataset, split by group, and (`with_reports`: for objectives that read the reports,
    `Objective.reads_reports`) the frozen report states, encoded once on `device` (the run's;
    default the CPU) into the on-disk text feature store."""
    dataset = build_dataset(config, with_reports)
    indices, training_notes, entries = training_splits(dataset, config)  # official split if any
    notes = [f"{config.data.name}: {len(dataset)} records"
             + "".join(f"; {n} left out ({why})" for why, n in dataset.skipped.items() if n)
             + "; split " + " / ".join(f"{name} {len(idx)}" for name, idx in indices.items())] + training_notes
    states, dims, identity = None, None, None
    if with_reports:
        encoder = FrozenTextEncoder(config.text_encoder.name)
        store = TextFeatureStore.for_encoder(config.resolved_cache_dir(), encoder, config.text_encoder.max_tokens)
        started = time.perf_counter()
        states, encoded = store.get_or_compute(encoder, dataset.texts, device=device)
        dims = text_dims(encoder)
        identity = {"name": config.text_encoder.name, "path": str(encoder.path), "identity": encoder.identity,
                    "max_tokens": config.text_encoder.max_tokens}
        tokens = float(states.lengths.mean()) if len(states) else 0.0
        notes.append(f"reports: {config.text_encoder.name}, frozen, {tokens:.0f} tokens on average "
                     f"(at most {config.text_encoder.max_tokens}); features ready in {time.perf_counter() - started:.1f} s"
                     + (f" ({encoded})" if encoded else ""))
    splits = {name: PairedSplit(dataset, idx, states) for name, idx in indices.items()}
    return PreparedData(dataset, splits, dims, notes, dataset_card(dataset, indices, config, entries=entries), identity)
