"""Training: SVI with Adam on mini-batches, KL annealing, early stopping, checkpoints and reports.

`prepare_data` is the one place that turns a config into data splits (with the frozen report
features, computed once and cached); `fit` runs SVI on the module's loss (minus Eq. 8) and keeps the
checkpoint with the best validation macro AUC; `report` evaluates a split from images alone and
writes metrics.json and roc.png.

The loop survives faults and uses the hardware: the batch order is a function of (seed, epoch)
(vkd_pyro.sampling), so `fit(resume=True)` continues from last.pt at the exact step of the epoch;
SIGINT/SIGTERM write last.pt and raise `Interrupted`; a NaN or infinite loss term raises
`TrainingDiverged` naming the step and the term (`FiniteWatch`, read without a per-step GPU sync);
under torchrun the module is wrapped in DistributedDataParallel (vkd_pyro.distributed).
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pyro
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vkd_pyro import distributed
from vkd_pyro.batching import Batch, PairedSplit, collate
from vkd_pyro.build import build_module, text_dims, uses_reports
from vkd_pyro.checkpoint import (RESUME_FORMAT, capture_rng_state, load_checkpoint, load_resume_state,
                                 restore_rng_state, save_atomic)
from vkd_pyro.classes import CLASSES
from vkd_pyro.config import Config, save_config
from vkd_pyro.data.registry import build_dataset
from vkd_pyro.data.splits import dataset_splits, split_label_mask
from vkd_pyro.diagnostics import TrainingLogger
from vkd_pyro.errors import Interrupted, TrainingDiverged, UserError
from vkd_pyro.evaluate import auc_metrics, format_auc_table, plot_roc, predict_split
from vkd_pyro.module import VKDModule
from vkd_pyro.objective import TERM_NAMES
from vkd_pyro.sampling import ResumableBatchSampler, drop_undersized, epoch_batches, epoch_generator
from vkd_pyro.schedules import KLSchedule

HISTORY_COLUMNS = ["epoch", "beta", "loss", "image_nll", "text_nll", "kl", "val_macro_auc", "seconds"]


def say(message: str) -> None:
    """Print a line (only on rank 0 when several processes train)."""
    if distributed.context().is_main:
        print(message, flush=True)


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when a GPU is visible, else cpu; `cuda` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for but no GPU is visible (use device=auto or device=cpu)")
    return torch.device(name)


@dataclass
class PreparedData:
    """A dataset, its train/validation/test splits and the frozen text encoder's block sizes."""

    dataset: object
    splits: dict
    dims: Optional[dict] = None
    notes: list = field(default_factory=list)


def prepare_data(config: Config, with_reports: bool = True) -> PreparedData:
    """Dataset, split by group, and (for objectives with a guide) cached frozen report states."""
    dataset = build_dataset(config)
    indices = dataset_splits(dataset, config.data.split, config.data.split_seed)  # official split if any
    notes = [f"{config.data.name}: {len(dataset)} records"
             + "".join(f"; {n} left out ({why})" for why, n in dataset.skipped.items() if n)
             + "; split " + " / ".join(f"{name} {len(idx)}" for name, idx in indices.items())]
    states, dims = None, None
    if with_reports and uses_reports(config):
        from vkd_pyro.encoders.text import FrozenTextEncoder, TextFeatureCache

        encoder = FrozenTextEncoder(config.text_encoder.name)
        cache = TextFeatureCache(config.resolved_cache_dir())
        started = time.perf_counter()
        states = cache.get_or_compute(encoder, dataset.texts, config.text_encoder.max_tokens)
        dims = text_dims(encoder)
        tokens = sum(int(s.shape[0]) for s in states) / max(1, len(states))
        notes.append(f"reports: {config.text_encoder.name}, frozen, {tokens:.0f} tokens on average "
                     f"(at most {config.text_encoder.max_tokens}); features ready in {time.perf_counter() - started:.1f} s")
    splits = {name: PairedSplit(dataset, idx, states) for name, idx in indices.items()}
    return PreparedData(dataset, splits, dims, notes)


def train_loader(split: PairedSplit, config: Config, epoch: int, start: int = 0,
                 ctx: Optional[distributed.DistContext] = None, pin_memory: bool = False) -> DataLoader:
    """The training batches of `epoch` from global batch `start` on, this process's share of each.

    The order is a function of (seed, epoch) (vkd_pyro.sampling): shuffled, and with reports
    batched by similar length (less padding). The loader's own generator (it seeds worker
    processes) is seeded the same way, so that loading draws nothing from the global RNG.
    """
    ctx = ctx or distributed.context()
    batches = global_batches(split, config, epoch, ctx.world_size)
    sampler = ResumableBatchSampler(batches, start, ctx.rank, ctx.world_size)
    return DataLoader(split, batch_sampler=sampler, collate_fn=collate, num_workers=config.data.num_workers,
                      pin_memory=pin_memory, generator=epoch_generator(config.seed, epoch))


def global_batches(split: PairedSplit, config: Config, epoch: int, world_size: int = 1) -> list[list[int]]:
    """The global batches of `epoch` (split positions); with several processes, without the
    batches smaller than the number of processes (they would leave one without examples)."""
    batches = epoch_batches(len(split), config.train.batch_size, config.seed, epoch, split.token_lengths())
    if world_size > 1:
        batches, _ = drop_undersized(batches, world_size)
    return batches


class SignalFlag:
    """While active (a context manager), SIGINT and SIGTERM are noted in `signum` instead of ending
    the process, so that the training loop can write its resume state first. A second SIGINT
    (Ctrl-C twice) raises KeyboardInterrupt at once. Outside the main thread it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def request(self, signum: int) -> None:
        """Act as if `signum` had arrived (train.stop_after_steps)."""
        self.signum = signum

    def __enter__(self) -> "SignalFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class FiniteWatch:
    """Remembers, on the device (no host read per step), the first step at which a loss term or
    the gradient norm was NaN or infinite, and which of them; `read()` brings it to the host."""

    NAMES = TERM_NAMES + ("gradient norm",)

    def __init__(self, device: torch.device, global_step: int = 0):
        self.step = torch.full((), int(global_step), dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad = torch.zeros(len(self.NAMES), dtype=torch.bool, device=device)

    def observe(self, terms: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.step += 1
        not_finite = ~torch.isfinite(torch.cat([terms, grad_norm.reshape(1).to(terms.dtype)]))
        new = not_finite.any() & (self.first_bad < 0)
        self.first_bad = torch.where(new, self.step, self.first_bad)
        self.bad = torch.where(new, not_finite, self.bad)

    def read(self) -> Optional[tuple[int, list[str]]]:
        """(global step, names of the non-finite terms) of the first bad step, or None."""
        values = torch.cat([self.first_bad.reshape(1), self.bad.long()]).tolist()
        if values[0] < 0:
            return None
        return values[0], [name for name, bad in zip(self.NAMES, values[1:]) if bad]


class TrainStep:
    """One SVI step on this process's share of a global batch; returns (terms (4,) of the global
    batch, gradient norm), both on the device: nothing is read back to the host.

    The share's mean loss is scaled by share/global size x processes, so that DDP's average of the
    processes' gradients is the gradient of the global batch's mean loss (exact also for unequal
    shares); the terms are summed across processes likewise. The gradient norm is taken after
    DDP's averaging (the same on every process) and, with `grad_clip`, the gradients are scaled
    to at most that norm.
    """

    def __init__(self, net: torch.nn.Module, module: VKDModule, optimizer: torch.optim.Optimizer,
                 grad_clip: Optional[float] = None, ctx: Optional[distributed.DistContext] = None):
        self.net = net
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.ctx = ctx or distributed.context()

    def __call__(self, batch: Batch, beta: float, global_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        loss, terms = self.net(batch, beta, sync_terms=False)
        if self.ctx.enabled:
            share = batch.size / global_size
            loss = loss * (share * self.ctx.world_size)
            terms = distributed.all_reduce_(terms * share)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
        if self.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, norm)
        self.optimizer.step()
        return terms, norm


class _StepTerms:
    """A step's terms for TrainingLogger.step: 0-d device tensors, read only when something logs them."""

    def __init__(self, terms: torch.Tensor, beta: float):
        self.loss, self.image_nll, self.text_nll, self.kl = terms.unbind(0)
        self.beta = beta


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


# Keys that `train --resume DIR key=value` may change: none changes the model, the data, the batch
# order or the random draws of the run.
RESUME_OVERRIDABLE = ("device", "cache_dir", "data.num_workers", "train.max_epochs", "train.patience",
                      "train.progress", "train.tensorboard", "train.eval_batch_size", "train.lr", "train.grad_clip",
                      "train.amp", "train.log_every", "train.checkpoint_every", "train.stop_after_steps",
                      "train.sync_batchnorm", "image_encoder.channels_last")


def resume_config(run_dir, overrides=()) -> Config:
    """The config of the run in `run_dir` (its config.yaml) with `overrides` of RESUME_OVERRIDABLE keys.

    `train.stop_after_steps` (a debug interruption) is not carried over unless given again.
    """
    from vkd_pyro.config import load_config, parse_override

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: run folder not found (--resume takes a folder written by `vkd-pyro train`)")
    given = set()
    for text in overrides:
        key, _ = parse_override(text)
        if key not in RESUME_OVERRIDABLE:
            raise UserError(f"{key}: cannot be changed when resuming (it would change the model, the data or the "
                            f"batch order); resumable keys: {', '.join(RESUME_OVERRIDABLE)}")
        given.add(key)
    config = load_config(run_dir / "config.yaml", overrides)
    if "train.stop_after_steps" not in given:
        config.train.stop_after_steps = None
    return config


def fit(config: Config, out_dir: Path, progress: Optional[bool] = None, resume: bool = False) -> dict:
    """Train as `config` says, write the run folder, and return the test metrics.

    resume=True continues the run in `out_dir` from its resume state last.pt: weights, optimizer,
    random generators, epoch, step within the epoch and the KL annealing position, so that an
    interrupted and resumed run ends with the same history and metrics as an uninterrupted one.

    Under torchrun (WORLD_SIZE > 1) each process trains on its share of every global batch through
    DistributedDataParallel; only rank 0 writes files. SIGINT/SIGTERM write last.pt and raise
    :class:`~vkd_pyro.errors.Interrupted`; a NaN or infinite loss term raises
    :class:`~vkd_pyro.errors.TrainingDiverged` and leaves the checkpoints as they were.
    """
    out_dir = Path(out_dir)
    ctx, device = distributed.init_from_env(resolve_device(config.device))
    try:
        # Pyro's argument checks read values back to the host at every step (a GPU sync): off.
        with pyro.validation_enabled(False):
            return _fit(config, out_dir, progress, resume, ctx, device)
    finally:
        distributed.shutdown()


def _fit(config: Config, out_dir: Path, progress: Optional[bool], resume: bool,
         ctx: distributed.DistContext, device: torch.device) -> dict:
    started = time.perf_counter()
    state = load_resume_state(out_dir) if resume else None
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    pyro.set_rng_seed(config.seed)
    with distributed.main_process_first():  # rank 0 fills the caches, the others read them
        data = prepare_data(config)
    for note in data.notes:
        say(note)
    if len(data.splits["train"]) == 0 or len(data.splits["validation"]) == 0:
        raise UserError("data: the train or validation split is empty (use more reports or change data.split)")
    if ctx.is_main:
        save_config(config, out_dir / "config.yaml")

    pyro.set_rng_seed(config.seed)  # the same initial weights whatever data preparation drew
    module = build_module(config, data.dims).to(device)
    if config.init_from and state is None:  # fine-tuning: the model.* weights of another run that match (vkd_pyro.finetune)
        from vkd_pyro.finetune import init_from_run
        say(init_from_run(module, config.init_from)["message"])
    if config.train.sync_batchnorm and ctx.enabled:
        if device.type != "cuda":
            raise UserError("train.sync_batchnorm: synchronised batch norm needs GPUs (device=cuda)")
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    inf, tr = config.inference, config.train
    say(f"objective {inf.objective} ({inf.elbo} ELBO), L={inf.num_particles} guide particles, "
        f"M={inf.prior_samples} prior samples, S={inf.test_samples} test samples; "
        f"{sum(p.numel() for p in module.parameters() if p.requires_grad):,} trainable parameters on {device}"
        + (f" x {ctx.world_size} processes ({ctx.backend})" if ctx.enabled else ""))
    optimizer = torch.optim.Adam(module.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
    train_split = data.splits["train"]
    T = len(global_batches(train_split, config, 1, ctx.world_size))
    if T == 0:
        raise UserError(f"train.batch_size: {tr.batch_size} is smaller than the {ctx.world_size} processes")
    schedule = KLSchedule(inf.annealing, T)

    loop, epoch_sums = LoopState(), torch.zeros(len(TERM_NAMES), device=device)
    if state is not None:
        loop, epoch_sums = _restore(state, module, optimizer, config, out_dir, device)
    net = module
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # `no_mi` at beta = 0 leaves the guide out of the loss: DDP must look for unused parameters.
        net = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=inf.objective == "no_mi")
    if state is not None:
        _restore_rng(state, config, ctx, loop)
    elif ctx.enabled:  # the same initial weights (DDP copies rank 0's anyway), different draws
        pyro.set_rng_seed(config.seed + RANK_SEED_STRIDE * ctx.rank)

    paths = {"history": out_dir / "history.csv", "last": out_dir / "last.pt", "best": out_dir / "checkpoint.pt"}
    if ctx.is_main:
        _write_history(paths["history"], loop.history)
    logger = TrainingLogger(out_dir, tr.tensorboard and ctx.is_main, start_step=loop.global_step)
    show = (tr.progress if progress is None else progress) and ctx.is_main
    sync_every = 1 if device.type == "cpu" else tr.log_every
    watch = FiniteWatch(device, loop.global_step)
    step = TrainStep(net, module, optimizer, tr.grad_clip, ctx)
    session_start = time.perf_counter()

    def save_last() -> None:
        loop.seconds += time.perf_counter() - save_last.since
        save_last.since = time.perf_counter()
        _save_resume(paths["last"], module, optimizer, loop, epoch_sums, T, config, data, ctx)

    save_last.since = started if state is None else session_start

    def check(terms: Optional[torch.Tensor], stop: SignalFlag, bar) -> None:
        """A sync point: divergence (on every process alike), progress, an agreed stop."""
        bad = watch.read()
        if bad is not None:
            bad_step, names = bad
            epoch, in_epoch = _locate(bad_step, loop, T)
            raise TrainingDiverged(
                f"training diverged at epoch {epoch}, step {in_epoch} (step {bad_step} in all): "
                f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} not finite; "
                + (f"{paths['last']} keeps the last good state ({loop.saved})" if loop.saved
                   else "no resume state was written yet")
                + (f" and {paths['best']} the best weights" if loop.best_epoch else "")
                + " (lower train.lr or set train.grad_clip)")
        if terms is not None and show:
            values = terms.tolist()
            bar.set_postfix(loss=f"{values[0]:.3f}", img=f"{values[1]:.3f}", txt=f"{values[2]:.3f}",
                            kl=f"{values[3]:.2f}")
        signum = _agreed_signal(stop, device, ctx)
        if signum is not None:
            bar.close()
            save_last()
            distributed.barrier()
            name = signal.Signals(signum).name
            say(f"{name}: stopped at epoch {loop.epoch}, step {loop.step_in_epoch} of {T}; "
                f"resume state written to {paths['last']}")
            raise Interrupted(f"interrupted by {name} at epoch {loop.epoch}, step {loop.step_in_epoch} of {T}; "
                              f"resume with: vkd-pyro train --resume {out_dir}", signum)

    stop = SignalFlag()
    with stop:
        while not loop.finished and loop.epoch <= tr.max_epochs:
            epoch_start = time.perf_counter()
            batches = global_batches(train_split, config, loop.epoch, ctx.world_size)
            loader = train_loader(train_split, config, loop.epoch, loop.step_in_epoch, ctx,
                                  pin_memory=device.type == "cuda")
            net.train()
            bar = tqdm(total=T, initial=loop.step_in_epoch, desc=f"epoch {loop.epoch}", leave=False,
                       disable=not show, file=sys.stderr)
            for batch, global_batch in zip(loader, batches[loop.step_in_epoch:]):
                loop.step_in_epoch += 1
                loop.global_step += 1
                beta = schedule(loop.step_in_epoch, loop.epoch)
                terms, grad_norm = step(batch.to(device), beta, len(global_batch))
                epoch_sums += terms
                loop.beta_sum += beta
                watch.observe(terms, grad_norm)
                logger.step(_StepTerms(terms, beta))
                bar.update(1)
                if tr.stop_after_steps == loop.global_step:
                    stop.request(signal.SIGTERM)
                checkpoint_now = bool(tr.checkpoint_every) and loop.global_step % tr.checkpoint_every == 0
                if (loop.global_step % sync_every == 0 or loop.step_in_epoch == T or checkpoint_now
                        or loop.global_step == tr.stop_after_steps):
                    check(terms, stop, bar)
                    if checkpoint_now:
                        save_last()
            bar.close()
            check(None, stop, bar)  # a resumed epoch whose steps were all done before has had none

            means = dict(zip(TERM_NAMES, (epoch_sums / max(loop.step_in_epoch, 1)).tolist()))
            means["beta"] = loop.beta_sum / max(loop.step_in_epoch, 1)
            val_split = data.splits["validation"]
            val_auc = _macro_auc(*_predictions(module, val_split, inf.test_samples, config, device), val_split, config)
            seconds = time.perf_counter() - epoch_start
            loop.history.append([str(loop.epoch)] + [f"{means[k]:.6g}" for k in HISTORY_COLUMNS[1:6]]
                                + [f"{val_auc:.6g}", f"{seconds:.2f}"])
            if ctx.is_main:
                _write_history(paths["history"], loop.history)
            logger.epoch(loop.epoch, {**means, "val_macro_auc": val_auc, "seconds": seconds})
            mark = ""
            if val_auc > loop.best_auc or loop.best_epoch == 0:
                loop.best_auc, loop.best_epoch, mark = val_auc, loop.epoch, " *"
                if ctx.is_main:
                    save_atomic({"module": module.state_dict(), "epoch": loop.epoch, "val_macro_auc": val_auc,
                                 "text_dims": data.dims, "config": config.to_dict()}, paths["best"])
            # Early stopping with the paper's tolerance: only a relative gain above it counts as progress.
            if val_auc > loop.reference_auc * (1 + tr.tolerance):  # AUCs are >= 0; starts at -inf
                loop.reference_auc, loop.wait = val_auc, 0
            else:
                loop.wait += 1
            say(f"epoch {loop.epoch:3d}  loss {means['loss']:.4f}  image NLL {means['image_nll']:.4f}  "
                f"text NLL {means['text_nll']:.4f}  KL {means['kl']:.3f}  beta {means['beta']:.2f}  "
                f"val macro AUC {val_auc:.4f}  {seconds:.1f}s{mark}")
            if loop.wait >= tr.patience:
                say(f"early stop: no validation gain above {tr.tolerance:.0%} for {loop.wait} epochs; "
                    f"best epoch {loop.best_epoch}")
                loop.finished = loop.stopped_early = True
            loop.epoch, loop.step_in_epoch, loop.beta_sum = loop.epoch + 1, 0, 0.0
            epoch_sums.zero_()
            loop.finished = loop.finished or loop.epoch > tr.max_epochs
            save_last()
            check(None, stop, bar)  # a signal during validation: last.pt is written, stop here

    distributed.barrier()  # checkpoint.pt is written
    module.load_state_dict(load_checkpoint(paths["best"])["module"])
    probs, labels = _predictions(module, data.splits["test"], inf.test_samples, config, device)
    extra = {"best_epoch": loop.best_epoch, "val_macro_auc": loop.best_auc,
             "train_seconds": loop.seconds + (time.perf_counter() - save_last.since),
             "skipped": data.dataset.skipped, **logger.close()}
    result = report(module, data, config, out_dir, "test", inf.test_samples, device, extra, predictions=(probs, labels))
    distributed.barrier()  # no process leaves while rank 0 writes
    return result


RANK_SEED_STRIDE = 7919  # seeds of the processes > 0: seed + stride * rank


def _locate(global_step: int, loop: LoopState, T: int) -> tuple[int, int]:
    """(epoch, step in epoch) of a global step at or before the loop's current position."""
    back = loop.global_step - global_step
    epoch, in_epoch = loop.epoch, loop.step_in_epoch - back
    while in_epoch < 1:
        epoch, in_epoch = epoch - 1, in_epoch + T
    return epoch, in_epoch


def _agreed_signal(stop: SignalFlag, device: torch.device, ctx: distributed.DistContext) -> Optional[int]:
    """The signal that stops the run: this process's, or with several processes the largest any
    received (all stop at the same step)."""
    if not ctx.enabled:
        return stop.signum
    flag = torch.tensor([stop.signum or 0], device=device)
    value = int(distributed.all_reduce_(flag, "max").item())
    return value or None


def _predictions(module: VKDModule, split, samples: int, config: Config, device) -> tuple[np.ndarray, np.ndarray]:
    """(mean probabilities, labels) of a whole split from images alone; with several processes,
    each predicts a shard (with rank 0's batch-norm statistics) and all receive the whole."""
    distributed.broadcast_buffers(module)

    def predict(part):
        return predict_split(module, part, samples, config.train.eval_batch_size, device,
                             num_workers=config.data.num_workers)

    probs, _, labels = distributed.gather_predictions(predict, split, len(CLASSES))
    return probs, labels


def _macro_auc(probs: np.ndarray, labels: np.ndarray, split, config: Config) -> float:
    """The macro AUC over the classes the split's labels define (nan when none)."""
    value = auc_metrics(labels, probs, CLASSES, split_label_mask(split), config.data.eval_classes)["macro_auc"]
    return float("nan") if value is None else value


def _write_history(path: Path, rows: list) -> None:
    """history.csv from its rows, written atomically (a resumed run rewrites it from last.pt)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HISTORY_COLUMNS)
        writer.writerows(rows)
    os.replace(tmp, path)


def _save_resume(path: Path, module: VKDModule, optimizer, loop: LoopState, epoch_sums: torch.Tensor, T: int,
                 config: Config, data: PreparedData, ctx: distributed.DistContext) -> None:
    """last.pt: everything `train --resume` needs (see vkd_pyro.checkpoint); rank 0 writes it
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
        "stopped_early": loop.stopped_early, "saved": where, "text_dims": data.dims, "config": config.to_dict(),
        "world_size": ctx.world_size,
    }, path)


def _restore(state: dict, module: VKDModule, optimizer, config: Config, out_dir: Path,
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
    if loop.finished:
        say(f"training had finished (best epoch {loop.best_epoch}); evaluating its best checkpoint again")
    say(f"resuming from {out_dir / 'last.pt'}: epoch {loop.epoch}, step {loop.step_in_epoch} "
        f"({loop.global_step} steps done)")
    return loop, state["epoch_sums"].to(device=device, dtype=torch.float32)


def _restore_rng(state: dict, config: Config, ctx: distributed.DistContext, loop: LoopState) -> None:
    """This process's generators as they were when last.pt was written (by the same number of
    processes); otherwise fresh seeds that depend on the step (the batch order is kept either way)."""
    states = state["rng"]
    if len(states) == ctx.world_size:
        restore_rng_state(states[ctx.rank])
    else:
        say(f"note: the run had {len(states)} processes and now has {ctx.world_size}: the batch order is "
            "kept, the random draws differ from an uninterrupted run")
        pyro.set_rng_seed(config.seed + RANK_SEED_STRIDE * ctx.rank + loop.global_step)


def report(module: VKDModule, data: PreparedData, config: Config, out_dir: Path, split: str, samples: int,
           device, extra: Optional[dict] = None, predictions: Optional[tuple] = None) -> dict:
    """Evaluate `split` from images alone; write metrics.json (metrics_<split>.json for other splits)
    and roc.png (roc_<split>.png); print the AUC table. Returns the metrics.

    `predictions` (mean probabilities, labels) computed beforehand (e.g. gathered from several
    processes) are used as they are; only rank 0 writes.
    """
    if predictions is None:
        probs, _, labels = predict_split(module, data.splits[split], samples, config.train.eval_batch_size, device)
    else:
        probs, labels = predictions
    mask = split_label_mask(data.splits[split])  # unknown labels (ignore policy, unmapped classes) left out
    metrics = auc_metrics(labels, probs, CLASSES, mask, config.data.eval_classes)
    inf = config.inference
    result = {"classes": list(CLASSES), "auc": metrics["auc"], "macro_auc": metrics["macro_auc"],
              "micro_auc": metrics["micro_auc"], "positives": metrics["positives"], "split": split,
              f"n_{split}": int(len(labels)), "objective": inf.objective, "elbo": inf.elbo,
              "mc": {"L": inf.num_particles, "M": inf.prior_samples, "S": samples},
              "dataset": config.data.name, "eval_classes": config.data.eval_classes, "seed": config.seed,
              **(extra or {})}
    if not distributed.context().is_main:
        return result
    suffix = "" if split == "test" else f"_{split}"
    (out_dir / f"metrics{suffix}.json").write_text(json.dumps(result, indent=2))
    plot_roc(labels, probs, CLASSES, out_dir / f"roc{suffix}.png", title=f"{inf.objective}, {split}",
             mask=mask, evaluated=config.data.eval_classes)
    say(f"\n{split} split, {len(labels)} records, images only (Algorithm 2, S={samples}):")
    say(format_auc_table({inf.objective: metrics}, CLASSES, metrics["positives"]))
    say(f"\nwrote {out_dir}/metrics{suffix}.json, roc{suffix}.png, history.csv, checkpoint.pt, last.pt, config.yaml")
    return result
