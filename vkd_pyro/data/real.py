"""Build a real dataset (`openi`, `mimic_cxr`, `chestxray14`) from a config's `data` section."""

from __future__ import annotations

from vkd_pyro import logs
from vkd_pyro.config import Config
from vkd_pyro.data.chestxray14 import ChestXray14Dataset
from vkd_pyro.data.mimic_cxr import MIMICCXRDataset
from vkd_pyro.data.openi import OpenIDataset
from vkd_pyro.errors import UserError


def build_real_dataset(config: Config, with_reports: bool = False, say=logs.info):
    """The real dataset `config.data.name` with the config's options (images cached in its cache dir).

    chestxray14 has no reports: `with_reports` (an objective that reads them) is a UserError here,
    before any image is decoded.
    """
    data = config.data
    common = dict(image_size=data.image_size, on_bad_record=data.on_bad_record, max_reports=data.max_reports,
                  cache_dir=config.resolved_cache_dir(), workers=data.num_workers, say=say, views=data.views)
    if data.name == "openi":
        return OpenIDataset(data.root, reports=data.reports, multi_image=data.multi_image,
                            include_indication=data.include_indication, label_policy=data.label_policy, **common)
    if data.name == "mimic_cxr":
        return MIMICCXRDataset(data.root, reports=data.reports, multi_image=data.multi_image,
                               label_policy=data.label_policy, blank_policy=data.blank_policy,
                               include_indication=data.include_indication, **common)
    if data.name == "chestxray14":
        if with_reports:
            raise UserError(f"inference.objective: {config.inference.objective} reads reports, but chestxray14 "
                            f"has none; use inference.objective=image_only (fine-tune with init_from=RUN_DIR)")
        if data.reports:
            raise UserError("data.reports: chestxray14 has no reports; leave data.reports null")

        return ChestXray14Dataset(data.root, val_fraction=data.val_fraction, split_seed=data.split_seed, **common)
    raise AssertionError(f"not a real dataset: {data.name}")
