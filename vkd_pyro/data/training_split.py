"""What training sees of a dataset: its splits, the training fraction, label noise and report control.

`training_splits(dataset, config)` is the one place that applies, in this order:

1. the split by group (or the dataset's official split), `data.split` and `data.split_seed`;
2. `data.label_noise` on the whole training split (vkd_pyro.data.label_noise: before the fraction cuts
   it, so that nested training fractions see the same noisy labels);
3. `data.train_fraction` (vkd_pyro.data.splits.reduce_train);
4. `data.report_control` on the training records that remain (vkd_pyro.data.report_control: the
   `labels` control lists the noisy labels).

Labels and texts are changed in the dataset object, for training records only; validation and test
records are never touched. Training, evaluation and `vkd-pyro data check` all call it, so a run's
test records and what its card says are those of its training.
"""

from __future__ import annotations

from vkd_pyro.config import Config
from vkd_pyro.data import label_noise, report_control
from vkd_pyro.data.splits import dataset_splits, record_names, reduce_train
from vkd_pyro.errors import ConfigError


def training_splits(dataset, config: Config) -> tuple[dict, list[str], dict]:
    """(indices: split name -> record indices, notes: one line per step for the log, card entries:
    {"label_noise": ..., "report_control": ...}, each None when off) for `dataset` under `config`."""
    data = config.data
    indices = dataset_splits(dataset, data.split, data.split_seed)
    notes, entries = [], {"label_noise": None, "report_control": None}
    if data.label_noise > 0:
        entries["label_noise"] = label_noise.apply_label_noise(
            dataset, indices["train"], record_names(dataset), data.label_noise, data.label_noise_kind, data.split_seed)
        notes.append(label_noise.describe(entries["label_noise"]))
    indices, fraction_note = reduce_train(indices, dataset.groups, data.train_fraction, data.split_seed)
    if data.train_fraction < 1:
        notes.append(fraction_note)
    if data.report_control != "none":
        if getattr(dataset, "texts", None) is None:
            raise ConfigError(f"data.report_control: {data.name} has no reports to replace")
        entries["report_control"] = report_control.apply_report_control(
            dataset, indices["train"], data.report_control, data.split_seed)
        notes.append(report_control.describe(entries["report_control"]))
    return indices, notes, entries
