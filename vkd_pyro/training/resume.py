"""Where a training run stands, and its resume state last.pt: what `vkd-pyro train --resume DIR` reads.

:class:`LoopState` is the loop's position (epoch, step, early stopping, history); `save_resume`
writes it atomically with the weights, the optimizer and the random generators of every process
(vkd_pyro.training.checkpoint), `restore` and `restore_rng` put them back, so that an interrupted and
resumed run ends as an uninterrupted one would.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import pyro
import torch

from vkd_pyro.config import Config, load_config, parse_override
from vkd_pyro.errors import UserError
from vkd_pyro.files import atomic_path
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.inference.terms import Term
from vkd_pyro.objectives.resolve import check_trusted
from vkd_pyro.training import distributed
from vkd_pyro.training.checkpoint import (
    RESUME_FORMAT,
    capture_rng_state,
    load_resume_state,
    restore_rng_state,
    save_atomic,
)
from vkd_pyro.training.config_match import RUN_TIME_KEYS, check_trained_with
from vkd_pyro.training.distributed import say
from vkd_pyro.training.run_folder import RUN_FILE, read_record

RANK_SEED_STRIDE = 7919  # seeds of the processes > 0: seed + stride * rank


@dataclass
class LoopState:
    """Where training stands: the next step is step `step_in_epoch + 1` of epoch `epoch`."""
    epoch: int = 1
    step_in_epoch: int = 0
    global_step: int = 0
    beta_sum: float = 0.0  # of this epoch's steps so far
    best_auc: float = -math.inf
    reference_auc: float = -math.inf
    wait: int = 0
    best_epoch: int = 0
    history: list = field(default_factory=list)  # history.csv rows (strings)
    seconds: float = 0.0  # training time of earlier sessions
    finished: bool = False
    stopped_early: bool = False
    saved: Optional[str] = None  # what last.pt holds, for messages


def resume_config(run_dir, overrides=(), trust_code: bool = False) -> Config:
    """The config of the run in `run_dir` (its config.yaml) with `overrides` of run-time keys
    (vkd_pyro.training.config_match.RUN_TIME_KEYS).

    `train.stop_after_steps` (a debug interruption) is not carried over unless given again. A prior,
    guide or objective named by an import path is refused unless `trust_code`
    (vkd_pyro.objectives.resolve.check_trusted).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found (--resume takes a folder written by `vkd-pyro train`)")
    given = set()
    for text in overrides:
        key, _ = parse_override(text)
        if key not in RUN_TIME_KEYS:
            raise UserError(f"{key}: cannot be changed when resuming (it would change the model, the data or the "
                            f"batch order); resumable keys: {', '.join(RUN_TIME_KEYS)}")
        given.add(key)
    config = load_config(run_dir / "config.yaml", overrides)
    check_trusted(config, str(run_dir / "config.yaml"), trust_code)
    if "train.stop_after_steps" not in given:
        config.train.stop_after_steps = None
    return config


def trains_on(state: dict, config: Config) -> bool:
    """Whether a resume from `state` (last.pt) trains: the run was not finished, or it ended at
    train.max_epochs (not by early stopping) and `config` raises train.max_epochs above the epochs it ran."""
    if not state.get("finished"):
        return True
    return not state.get("stopped_early") and int(state["epoch"]) <= config.train.max_epochs


def starts_over(run_dir: Path) -> bool:
    """Whether `train --resume` starts the run in `run_dir` from the beginning, keeping its run id:
    run.json names a run that is not finished and no last.pt was written yet (it stopped before its
    first checkpoint: a signal, a full disk, a crash); its config is config.yaml, written when it started."""
    record = read_record(run_dir)
    return record is not None and record.get("status") != "finished" and not (run_dir / "last.pt").exists()


def resume_check(run_dir, config: Config) -> Optional[str]:
    """What `train --resume` checks under the folder's lock before it writes anything
    (vkd_pyro.training.run_folder.open_run): UserError (one line) when last.pt is unreadable, is
    another run's, or was trained with another config than `config` (config.yaml and the resume
    overrides) outside the run-time keys (vkd_pyro.training.config_match.check_trained_with); the line
    saying so when the run is finished and `config` gives it nothing more to do (None when it trains
    on, or its test report is missing)."""
    run_dir = Path(run_dir)
    if starts_over(run_dir):  # nothing to check against: the run trains from the beginning
        return None
    state = load_resume_state(run_dir)
    record = read_record(run_dir)
    found = state.get("run_id")
    if record is not None and found is not None and found != record["run_id"]:
        raise UserError(f"{run_dir / 'last.pt'}: is from run {found} but the folder's {RUN_FILE} names run "
                        f"{record['run_id']}; it cannot continue this run")
    if not isinstance(state["config"], dict):
        raise UserError(f"{run_dir / 'last.pt'}: not a vkd-pyro resume state (its config is not a mapping)")
    check_trained_with(state["config"], config, run_dir / "last.pt", run_dir / "config.yaml")
    if trains_on(state, config) or record is None or record.get("status") != "finished" or \
            not (run_dir / "metrics.json").is_file():
        return None
    epochs = int(state["epoch"]) - 1
    best = int(state["early_stopping"]["best_epoch"])
    why = (f"stopped early after {epochs} epochs" if state.get("stopped_early")
           else f"ran its {epochs} epochs (raise train.max_epochs above {epochs} to train on)")
    return f"{run_dir}: run {record['run_id']} is finished, best epoch {best}; it {why}: nothing to do"


def locate(global_step: int, loop: LoopState, T: int) -> tuple[int, int]:
    """(epoch, step in epoch) of a global step at or before the loop's current position."""
    back = loop.global_step - global_step
    epoch, in_epoch = loop.epoch, loop.step_in_epoch - back
    while in_epoch < 1:
        epoch, in_epoch = epoch - 1, in_epoch + T
    return epoch, in_epoch


def history_columns(terms: Sequence[Term]) -> list[str]:
    """history.csv's columns: the epoch, its mean beta, the objective's terms (epoch means, in the
    objective's order), the validation macro AUC and the epoch's seconds."""
    return ["epoch", "beta", *(t.name for t in terms), "val_macro_auc", "seconds"]


def write_history(path: Path, terms: Sequence[Term], rows: list) -> None:
    """history.csv from its rows, written atomically (a resumed run rewrites it from last.pt)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(history_columns(terms))
        writer.writerows(rows)


def save_resume(path: Path, module: VKDModule, optimizer, loop: LoopState, epoch_sums: torch.Tensor, T: int,
                 config: Config, dims: Optional[dict], ctx: distributed.DistContext) -> None:
    """last.pt: everything `train --resume` needs (see vkd_pyro.training.checkpoint); rank 0 writes it
    with the RNG states of all processes."""
    rng = distributed.all_gather_objects(capture_rng_state())
    where = (f"epoch {loop.epoch}, step {loop.step_in_epoch}" if loop.step_in_epoch
             else f"end of epoch {loop.epoch - 1}")
    loop.saved = where
    if not ctx.is_main:
        return
    save_atomic({
        "format": RESUME_FORMAT, "module": module.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": None, "rng": rng, "epoch": loop.epoch, "step_in_epoch": loop.step_in_epoch,
        "global_step": loop.global_step,
        "annealing": {"t": loop.step_in_epoch, "T": T, "beta_sum": loop.beta_sum},
        "epoch_sums": epoch_sums.detach().cpu(),
        "early_stopping": {"best_auc": loop.best_auc, "reference_auc": loop.reference_auc, "wait": loop.wait,
                           "best_epoch": loop.best_epoch},
        "history": loop.history, "seconds": loop.seconds, "finished": loop.finished,
        "stopped_early": loop.stopped_early, "saved": where, "text_dims": dims, "config": config.to_dict(),
        "world_size": ctx.world_size,
    }, path)


def restore(state: dict, module: VKDModule, optimizer, config: Config, out_dir: Path,
             device: torch.device) -> tuple[LoopState, torch.Tensor]:
    """Weights, optimizer and loop position from a resume state (the RNG comes last: _restore_rng)."""
    try:
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UserError(f"{out_dir / 'last.pt'}: does not match {out_dir / 'config.yaml'} "
                        f"({str(exc).splitlines()[0]})") from None
    for group in optimizer.param_groups:  # train.lr may be changed on resume
        group["lr"] = config.train.lr
    early = state["early_stopping"]
    loop = LoopState(epoch=int(state["epoch"]), step_in_epoch=int(state["step_in_epoch"]),
                     global_step=int(state["global_step"]), beta_sum=float(state["annealing"]["beta_sum"]),
                     best_auc=float(early["best_auc"]), reference_auc=float(early["reference_auc"]),
                     wait=int(early["wait"]), best_epoch=int(early["best_epoch"]), history=list(state["history"]),
                     seconds=float(state.get("seconds", 0.0)), finished=bool(state.get("finished")),
                     stopped_early=bool(state.get("stopped_early")), saved=state.get("saved"))
    if loop.finished and not loop.stopped_early and loop.epoch <= config.train.max_epochs:
        loop.finished = False  # train.max_epochs was raised: train on
        say(f"training had finished after {loop.epoch - 1} epochs; train.max_epochs is now "
            f"{config.train.max_epochs}: training on")
    if loop.finished:
        say(f"training had finished (best epoch {loop.best_epoch}); evaluating its best checkpoint again")
    say(f"resuming from {out_dir / 'last.pt'}: epoch {loop.epoch}, step {loop.step_in_epoch} "
        f"({loop.global_step} steps done)")
    return loop, state["epoch_sums"].to(device=device, dtype=torch.float32)


def restore_rng(state: dict, config: Config, ctx: distributed.DistContext, loop: LoopState) -> None:
    """This process's generators as they were when last.pt was written (by the same number of
    processes); otherwise fresh seeds that depend on the step (the batch order is kept either way)."""
    states = state["rng"]
    if len(states) == ctx.world_size:
        restore_rng_state(states[ctx.rank])
    else:
        say(f"note: the run had {len(states)} processes and now has {ctx.world_size}: the batch order is "
            "kept, the random draws differ from an uninterrupted run")
        pyro.set_rng_seed(config.seed + RANK_SEED_STRIDE * ctx.rank + loop.global_step)
