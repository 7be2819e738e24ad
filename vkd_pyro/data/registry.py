"""Datasets by `data.name`: each gives a torchxrayvision-style dataset with report texts and groups."""

from __future__ import annotations

from vkd_pyro.config import Config
from vkd_pyro.data.openi_phantom import OpenIPhantomDataset
from vkd_pyro.data.real import build_real_dataset

#: Datasets read from their real releases (vkd_pyro.data.real).
REAL_DATASETS = ("openi", "mimic_cxr", "chestxray14")


def build_dataset(config: Config, with_reports: bool = False):
    """The dataset a config names (`with_reports`: the run reads the reports, which an image-only
    dataset refuses). It has `labels` (N, 14), `texts` (N reports), `groups` (the unit
    a split keeps together) and `skipped` (records left out, by reason)."""
    data = config.data
    if data.name == "openi_phantom":
        return OpenIPhantomDataset(root=data.root, image_size=data.image_size, signal=data.signal,
                                   include_indication=data.include_indication, max_reports=data.max_reports,
                                   cache_dir=config.resolved_cache_dir(), difficulty=data.difficulty,
                                   label_policy=data.label_policy)
    if data.name in REAL_DATASETS:
        return build_real_dataset(config, with_reports)
    raise AssertionError(f"unknown dataset {data.name}")  # the config validator lists the known names
