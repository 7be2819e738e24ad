"""A trained run folder's weights as a module: the one loading path of `load_run` (the Python API,
evaluate, predict, diagnose, figures) and of the kd teacher."""

from __future__ import annotations

from pathlib import Path

from vkd_pyro.config import Config, load_config
from vkd_pyro.errors import UserError
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.objectives.resolve import check_trusted
from vkd_pyro.training.build import build_module, check_config
from vkd_pyro.training.checkpoint import load_checkpoint
from vkd_pyro.training.config_match import check_trained_with
from vkd_pyro.training.device import resolve_device
from vkd_pyro.training.run_folder import check_loadable, read_record


def read_run_config(folder: Path, trust_code: bool = False) -> Config:
    """The config.yaml of the run in `folder`, refused (one line) when it names a prior, guide or
    objective by an import path and `trust_code` is False: nothing it names is imported."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: run folder not found (train writes one with --out)")
    config = load_config(folder / "config.yaml")
    check_trusted(config, str(folder / "config.yaml"), trust_code)
    return config


def load_trained(folder, device: str = "cpu", trust_code: bool = False) -> tuple[Config, VKDModule, dict]:
    """(config, module, checkpoint) of the run in `folder` (config.yaml + checkpoint.pt), the module on
    `device` (cpu, cuda or auto) in eval mode; the config's `device` is set to `device`. A run
    trained on a GPU loads on a CPU: the weights are read to the CPU first.

    One-line UserError when the folder holds no checkpoint yet, when the weights and the config are
    not the same run's or another process is training it now
    (vkd_pyro.training.run_folder.check_loadable), when config.yaml names code by an import path
    and `trust_code` is False (:func:`read_run_config`), and when config.yaml differs from the config
    checkpoint.pt was trained with outside the run-time keys
    (vkd_pyro.training.config_match.check_trained_with; a checkpoint without a config, written before
    checkpoints carried theirs, has nothing to compare and is loaded). The comparison comes after the
    config's families and objective are resolved (`check_config`) and before the module is built:
    nothing an edited config implies is allocated.
    """
    folder = Path(folder)
    config = read_run_config(folder, trust_code)
    config.device = device
    record = read_record(folder)
    unfinished = record is not None and record.get("status") in ("running", "failed")
    if unfinished and not (folder / "checkpoint.pt").is_file():
        raise UserError(f"{folder}: run {record['run_id']} is {record['status']}"
                        + (f" ({record['reason']})" if record.get("reason") else "")
                        + " and has written no checkpoint.pt (it is written at the end of the first epoch)")
    checkpoint = load_checkpoint(folder / "checkpoint.pt")
    check_loadable(folder, checkpoint)
    check_config(config)
    check_trained_with(checkpoint.get("config"), config, folder / "checkpoint.pt", folder / "config.yaml")
    target = resolve_device(device)
    module = build_module(config, checkpoint.get("text_dims"))
    try:
        module.load_state_dict(checkpoint["module"])
    except (KeyError, RuntimeError) as exc:
        raise UserError(f"{folder / 'checkpoint.pt'}: does not match {folder / 'config.yaml'} "
                        f"({str(exc).splitlines()[0]})") from None
    module.to(target).eval()
    return config, module, checkpoint
