"""Checkpoints: written atomically (temporary file, fsync, then rename), read with weights_only=True.

A run folder holds two:

- `checkpoint.pt`: the weights with the best validation macro AUC (what `evaluate` and `predict`
  read): {"module", "epoch", "val_macro_auc", "text_dims", "config"}.
- `last.pt`: the resume state, written at the end of every epoch (and every
  `train.checkpoint_every` steps) and on SIGINT/SIGTERM: {"format", "module", "optimizer",
  "scheduler", "rng", "epoch", "step_in_epoch", "global_step", "annealing", "epoch_sums",
  "early_stopping", "history", "text_dims", "config", "world_size", "finished"}. `rng` holds, for
  each process, the torch (CPU and its GPU's), numpy and Python `random` states (Pyro draws from these
  three); the batch order needs no generator state: it is a function of (seed, epoch)
  (vkd_pyro.data.sampling), and `step_in_epoch` says how many of that epoch's batches are done.

Both carry `config`, the resolved config of the training that wrote them (`Config.to_dict()`: the
config file, the overrides and every default): what `train --resume` and every reader of the weights
compare with the folder's config.yaml (vkd_pyro.training.config_match).

Both carry `run_id`, the id of the run that wrote them (vkd_pyro.training.run_folder): `save_atomic`
adds it to every checkpoint written into a run folder that this process has open, and
`load_resume_state` refuses a last.pt of another run than the one the folder's run.json names.

Everything in them is a tensor or a plain Python value, so that `torch.load(weights_only=True)`
reads them: numpy's RNG state is stored as a tensor and plain numbers.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from vkd_pyro.errors import UserError
from vkd_pyro.files import atomic_path
from vkd_pyro.training.run_folder import open_run_id

RESUME_FORMAT = 1
RESUME_KEYS = ("module", "optimizer", "rng", "epoch", "step_in_epoch", "global_step", "epoch_sums",
               "early_stopping", "history", "config")


def save_atomic(obj, path: os.PathLike) -> None:
    """torch.save through `vkd_pyro.files.atomic_path`: a reader (or a crash at any moment) sees
    either the old file or the whole new one, never half a file. A dict written into a run folder that
    this process has open (vkd_pyro.training.run_folder.open_run) gets that run's `run_id`."""
    run_id = open_run_id(Path(path).parent)
    if run_id is not None and isinstance(obj, dict):
        obj = {**obj, "run_id": run_id}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: os.PathLike) -> dict:
    """A checkpoint written by `train` (tensors and plain Python values only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found (a run folder written by `vkd-pyro train` holds checkpoint.pt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"{path}: not a readable vkd-pyro checkpoint ({type(exc).__name__})") from None


def load_resume_state(run_dir: os.PathLike) -> dict:
    """The resume state `last.pt` of a run folder, checked for the keys `train --resume` needs."""
    path = Path(run_dir) / "last.pt"
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: run folder not found (--resume takes a folder written by `vkd-pyro train`)")
    if not path.is_file():
        raise UserError(f"{path}: no resume state (runs write last.pt at the end of each epoch and when interrupted)")
    state = load_checkpoint(path)
    missing = [k for k in RESUME_KEYS if k not in state]
    if state.get("format") != RESUME_FORMAT or missing:
        raise UserError(f"{path}: not a vkd-pyro resume state of format {RESUME_FORMAT}"
                        + (f" (missing {', '.join(missing)})" if missing else ""))
    expected = open_run_id(run_dir)
    if expected is not None and state.get("run_id", expected) != expected:
        raise UserError(f"{path}: is from run {state['run_id']} but the folder's run.json names run {expected}; "
                        "it cannot continue this run")
    return state


def capture_rng_state() -> dict:
    """This process's random number generator states: torch CPU and CUDA, numpy, Python `random`."""
    keys_name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(keys_name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "random": random.getstate(),
        # The current device's only: a process uses one GPU (querying all would open them all).
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }
    return state


def restore_rng_state(state: dict) -> None:
    """Set the generators to a state from :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
