"""Distillation (objective `kd`): the teacher run's probabilities for the training split, computed once.

The teacher *run* is a finished `text_only` run folder (`inference.kd.teacher`: its config.yaml and
checkpoint.pt), loaded as `load_run` loads a run (identity and --trust-code checks); its report
head q(y|z_T) is what metrics.json calls a run's `teacher`. The path may name the run's own values
in braces, `{seed}` and `{data.<key>}` (e.g.
`teachers/runs/data.train_fraction={data.train_fraction}-seed{seed}`), so that one sweep distils
each seed and training fraction from its own teacher. The teacher must have read the same records
with the same report encoder: its `data` section (but for the keys that only change the images:
IMAGE_KEYS) and its `text_encoder` section equal this run's (ConfigError naming
`inference.kd.teacher` otherwise), so that the training split and its token states are the same.
For each training record the teacher's probability p_teacher,c is the mean over S =
`inference.test_samples` draws z_T ~ q(z_T|x_T) of sigmoid(logit_c(z_T))
(`vkd_pyro.training.evaluate.teacher_split`, dropout off); the soft target is that probability at
temperature T, sigmoid(logit(p_teacher,c) / T) (`vkd_pyro.models.tempered`). The draws use a
generator of their own (seeded by the run's seed), not the run's: a resumed run recomputes the same
targets and trains on as if it had not stopped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vkd_pyro.classes import NUM_CLASSES
from vkd_pyro.config import Config
from vkd_pyro.errors import ConfigError
from vkd_pyro.models import tempered
from vkd_pyro.objectives import objective_for
from vkd_pyro.training.evaluate import seeded, teacher_split
from vkd_pyro.training.load import load_trained, read_run_config

KEY = "inference.kd.teacher"
SHARED_SECTIONS = ("data", "text_encoder")  # what the teacher must share with the student
IMAGE_KEYS = ("image_size", "signal", "difficulty", "num_workers")  # data keys a text teacher does not see


def teacher_folder(config: Config) -> Path:
    """`inference.kd.teacher` with `{seed}` and `{data.<key>}` filled in from `config`."""
    try:
        return Path(config.inference.kd.teacher.format(seed=config.seed, data=config.data))
    except (KeyError, AttributeError, IndexError, ValueError) as exc:
        raise ConfigError(f"{KEY}: {config.inference.kd.teacher!r} names an unknown value ({exc}); use "
                          "{seed} or {data.<key>}") from None


def check_teacher(config: Config, trust_code: bool = False) -> tuple[Path, Config]:
    """(the teacher's folder, its config) for `config` (objective kd), before any data is read;
    ConfigError naming inference.kd.teacher for a folder that is not a finished run of the same
    data whose objective predicts from the reports (`text_only`), or whose config names code by an
    import path when `trust_code` is False (the same rule as `load_run`)."""
    folder = teacher_folder(config)
    if not (folder / "config.yaml").is_file() or not (folder / "checkpoint.pt").is_file():
        raise ConfigError(f"{KEY}: {folder} is not a finished run folder (it needs config.yaml and checkpoint.pt)")
    try:
        teacher_config = read_run_config(folder, trust_code)
        teacher_objective = objective_for(teacher_config)
    except ConfigError as exc:
        raise ConfigError(f"{KEY}: {exc}") from None
    if teacher_objective.predicts_from != "reports":
        raise ConfigError(f"{KEY}: {folder} was trained with objective {teacher_config.inference.objective}, "
                          "not text_only (a teacher predicts from the reports)")
    ours, theirs = config.to_dict(), teacher_config.to_dict()
    for section in SHARED_SECTIONS:
        differ = sorted(k for k in ours[section] if ours[section][k] != theirs[section].get(k)
                        and not (section == "data" and k in IMAGE_KEYS))
        if differ:
            raise ConfigError(f"{KEY}: {folder} read other data: {section}.{differ[0]} is "
                              f"{theirs[section].get(differ[0])!r} there, {ours[section][differ[0]]!r} here")
    return folder, teacher_config


def load_teacher(config: Config, device, trust_code: bool = False) -> torch.nn.Module:
    """The teacher module of `config` (objective kd) on `device`, in eval mode: `check_teacher`, then
    the run folder loaded as `load_run` loads it (`vkd_pyro.training.load.load_trained`: the weights
    must be the run's own)."""
    folder, _ = check_teacher(config, trust_code)
    _, module, _ = load_trained(folder, str(torch.device(device).type), trust_code)
    return module.to(device)


def soft_targets(config: Config, data, device, trust_code: bool = False) -> torch.Tensor:
    """(N, C) float32 on `device`: row i = the tempered teacher probabilities of dataset record i for
    the training split's records, NaN elsewhere (never read: training batches hold training records)."""
    teacher = load_teacher(config, device, trust_code)
    train = data.splits["train"]
    table = torch.full((len(data.dataset), NUM_CLASSES), float("nan"))
    with seeded(config.seed, device):  # a generator of its own: the run's draws are untouched
        probs, _, _ = teacher_split(teacher, train, config.inference.test_samples, config.train.eval_batch_size,
                                    device)
    table[torch.as_tensor(np.asarray(train.indices))] = tempered(torch.as_tensor(probs), config.inference.kd.temperature)
    return table.to(device)
