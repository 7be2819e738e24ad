"""A run is what it trained with: the config its weights were trained with against its config.yaml.

checkpoint.pt and last.pt carry the resolved config of the training that wrote them (`Config.to_dict()`,
vkd_pyro.training.checkpoint). Whatever reads the weights again (`train --resume`, and `load_trained`:
evaluate, predict, diagnose, figures, `load_run`, the kd teacher) compares it with the folder's
config.yaml through :func:`check_trained_with` and refuses a difference outside RUN_TIME_KEYS: an
edited `data.split_seed` would evaluate on another split, whose test set holds training records; an
edited `model.z_dim` or `data.image_size` describes another model than the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from vkd_pyro.config import Config
from vkd_pyro.errors import UserError
from vkd_pyro.training.run_folder import flatten

# The run-time keys: where and how visibly a run computes (device, cache_dir, data.num_workers, the
# evaluation batch, progress and logging), where its data lives (data.root, data.reports: a dataset
# moved to another machine or folder is the same dataset; the files themselves are not fingerprinted), and what `train --resume DIR key=value` may change without
# changing the model, the data, the batch order or the random draws (train.max_epochs, train.lr, ...).
# They are the only keys in which config.yaml may differ from the config of the weights: a resumed
# run rewrites config.yaml with them while its checkpoint.pt may be from before the resume.
RUN_TIME_KEYS = ("device", "cache_dir", "data.root", "data.reports", "data.num_workers", "train.max_epochs",
                 "train.patience", "train.progress", "train.tensorboard", "train.eval_batch_size", "train.lr", "train.grad_clip",
                 "train.amp", "train.log_every", "train.checkpoint_every", "train.stop_after_steps",
                 "train.sync_batchnorm", "image_encoder.channels_last")

SHOWN = 3  # differences shown with their values; the others are named


def config_differences(trained: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in `trained`, value in `now`) for each key outside RUN_TIME_KEYS whose values
    differ, in key order. Both are config mappings (`Config.to_dict()`); a key only one of them holds
    (one added to or removed from the schema since the weights were written) is not compared."""
    a, b = flatten(trained), flatten(now)
    return [(key, a[key], b[key]) for key in sorted(set(a) & set(b))
            if a[key] != b[key] and key not in RUN_TIME_KEYS]


def check_trained_with(trained: Optional[dict], config: Config, weights: Path, config_file: Path) -> None:
    """UserError (one line) when `config` (read from `config_file`) differs from `trained`, the config
    stored in the checkpoint `weights`, outside RUN_TIME_KEYS: the first SHOWN keys with both values,
    the others by name. `trained` None (a checkpoint written before checkpoints carried their config)
    has nothing to compare and is accepted; a `trained` that is not a mapping is not vkd-pyro's."""
    if trained is None:
        return
    if not isinstance(trained, dict):
        raise UserError(f"{weights}: not a vkd-pyro checkpoint (its config is not a mapping)")
    differ = config_differences(trained, config.to_dict())
    if not differ:
        return
    shown = "; ".join(f"{key}: {there} in {weights.name}, {here} in {config_file.name}"
                      for key, there, here in differ[:SHOWN])
    rest = [key for key, _, _ in differ[SHOWN:]]
    if rest:
        shown += f"; and {len(rest)} more: {', '.join(rest)}"
    raise UserError(f"{config_file}: does not match the weights in {weights} ({shown}); "
                    "put config.yaml back, or train the changed config into a new folder")
