"""Training: SVI with Adam on mini-batches, KL annealing, early stopping, checkpoints and reports.

`prepare_data` is the one place that turns a config into data splits (with the frozen report
features, computed once and cached); `fit` runs SVI on the module's loss (minus Eq. 8) and keeps the
checkpoint with the best validation macro AUC; `report` evaluates a split from images alone and
writes metrics.json and roc.png.

The loop survives faults and uses the hardware: the batch order is a function of (seed, epoch)
(vkd_pyro.sampling), so `fit(resume=True)` continues from last.pt at the exact step of the epoch
(vkd_pyro.resume); SIGINT/SIGTERM write last.pt and raise `Interrupted`; a NaN or infinite loss term
raises `TrainingDiverged` naming the step and the term (vkd_pyro.stops: noted without a per-step GPU
sync); under torchrun the module is wrapped in DistributedDataParallel (vkd_pyro.distributed).
"""

from __future__ import annotations

import json
import signal
import sys
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
from vkd_pyro.checkpoint import load_checkpoint, load_resume_state, save_atomic
from vkd_pyro.classes import CLASSES
from vkd_pyro.config import Config, save_config
from vkd_pyro.data.registry import build_dataset
from vkd_pyro.data.splits import dataset_splits, split_label_mask
from vkd_pyro.diagnostics import TrainingLogger
from vkd_pyro.distributed import say
from vkd_pyro.errors import Interrupted, TrainingDiverged, UserError
from vkd_pyro.evaluate import auc_metrics, format_auc_table, plot_roc, predict_split
from vkd_pyro.module import VKDModule
from vkd_pyro.objective import TERM_NAMES
from vkd_pyro.resume import (HISTORY_COLUMNS, RANK_SEED_STRIDE, LoopState, locate, restore, restore_rng,
                             save_resume, write_history)
from vkd_pyro.sampling import ResumableBatchSampler, drop_undersized, epoch_batches, epoch_generator
from vkd_pyro.schedules import KLSchedule
from vkd_pyro.stops import FiniteWatch, SignalFlag, agreed_signal


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
        from vkd_pyro.data.text_store import TextFeatureStore
        from vkd_pyro.encoders.text import FrozenTextEncoder

        encoder = FrozenTextEncoder(config.text_encoder.name)
        store = TextFeatureStore.for_encoder(config.resolved_cache_dir(), encoder, config.text_encoder.max_tokens)
        started = time.perf_counter()
        states, encoded = store.get_or_compute(encoder, dataset.texts, device=resolve_device(config.device))
        dims = text_dims(encoder)
        tokens = float(states.lengths.mean()) if len(states) else 0.0
        notes.append(f"reports: {config.text_encoder.name}, frozen, {tokens:.0f} tokens on average "
                     f"(at most {config.text_encoder.max_tokens}); features ready in {time.perf_counter() - started:.1f} s"
                     + (f" ({encoded})" if encoded else ""))
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


def adam(module: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam on the module's parameters (those without a gradient are left as they are), torch's fused
    implementation where the device has it: one kernel over all parameters, where the default on the
    CPU loops over them one at a time (benchmarks/README.md: the step 10-25% faster on the CPU);
    the same update rule either way."""
    params = list(module.parameters())
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


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
    optimizer = adam(module, tr.lr, tr.weight_decay)
    train_split = data.splits["train"]
    T = len(global_batches(train_split, config, 1, ctx.world_size))
    if T == 0:
        raise UserError(f"train.batch_size: {tr.batch_size} is smaller than the {ctx.world_size} processes")
    schedule = KLSchedule(inf.annealing, T)
    if schedule.warning():
        say(schedule.warning())

    loop, epoch_sums = LoopState(), torch.zeros(len(TERM_NAMES), device=device)
    if state is not None:
        loop, epoch_sums = restore(state, module, optimizer, config, out_dir, device)
    net = module
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # `no_mi` at beta = 0 leaves the guide out of the loss: DDP must look for unused parameters.
        net = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=inf.objective == "no_mi")
    if state is not None:
        restore_rng(state, config, ctx, loop)
    elif ctx.enabled:  # the same initial weights (DDP copies rank 0's anyway), different draws
        pyro.set_rng_seed(config.seed + RANK_SEED_STRIDE * ctx.rank)

    paths = {"history": out_dir / "history.csv", "last": out_dir / "last.pt", "best": out_dir / "checkpoint.pt"}
    if ctx.is_main:
        write_history(paths["history"], loop.history)
    logger = TrainingLogger(out_dir, tr.tensorboard and ctx.is_main, start_step=loop.global_step)
    show = (tr.progress if progress is None else progress) and ctx.is_main
    sync_every = 1 if device.type == "cpu" else tr.log_every
    watch = FiniteWatch(device, loop.global_step)
    step = TrainStep(net, module, optimizer, tr.grad_clip, ctx)
    session_start = time.perf_counter()

    def save_last() -> None:
        loop.seconds += time.perf_counter() - save_last.since
        save_last.since = time.perf_counter()
        save_resume(paths["last"], module, optimizer, loop, epoch_sums, T, config, data.dims, ctx)

    save_last.since = started if state is None else session_start

    def check(terms: Optional[torch.Tensor], stop: SignalFlag, bar) -> None:
        """A sync point: divergence (on every process alike), progress, an agreed stop."""
        bad = watch.read()
        if bad is not None:
            bad_step, names = bad
            epoch, in_epoch = locate(bad_step, loop, T)
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
        signum = agreed_signal(stop, device, ctx)
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
                write_history(paths["history"], loop.history)
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
