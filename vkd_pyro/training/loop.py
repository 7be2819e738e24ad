"""Training: SVI with Adam on mini-batches, KL annealing, early stopping, checkpoints, the test report.

`fit(config, out_dir)` trains as the config says: a :class:`Trainer` owns the run's state (data,
module, optimizer, loop position, paths) and runs SVI on the module's loss (minus Eq. 8), keeping
the checkpoint with the best validation macro AUC, then evaluates the test split from images alone
(`vkd_pyro.training.evaluate.report`).

The loop survives faults and uses the hardware: the batch order is a function of (seed, epoch)
(vkd_pyro.data.sampling), so a resumed run continues from last.pt at the exact step of the epoch
(vkd_pyro.training.resume); SIGINT/SIGTERM in the loop write last.pt and raise `Interrupted`, and
anywhere else in the run (claiming the folder, preparing the data, the test report) raise it too,
config.yaml being written as soon as the folder is claimed, so that `--resume` always works (with no
last.pt yet, from the beginning); a NaN or infinite loss term raises `TrainingDiverged` naming the
step and the term (vkd_pyro.training.stops: noted without a per-step GPU sync); under torchrun the
module is wrapped in DistributedDataParallel (vkd_pyro.training.distributed).
"""

from __future__ import annotations

import errno
import json
import shlex
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import pyro
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vkd_pyro import logs
from vkd_pyro.classes import CLASSES
from vkd_pyro.config import Config, save_config
from vkd_pyro.data.batching import Batch, PairedSplit, collate
from vkd_pyro.data.prepare import prepare_data
from vkd_pyro.data.sampling import ResumableBatchSampler, drop_undersized, epoch_batches, epoch_generator
from vkd_pyro.data.splits import split_label_mask
from vkd_pyro.errors import Interrupted, TrainingDiverged, UserError
from vkd_pyro.files import WRITE_REFUSED
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.inference.schedules import KLSchedule
from vkd_pyro.inference.terms import StepTerms
from vkd_pyro.training import distributed
from vkd_pyro.training.build import check_config, initial_module
from vkd_pyro.training.checkpoint import load_checkpoint, load_resume_state, save_atomic
from vkd_pyro.training.device import resolve_device
from vkd_pyro.training.distillation import check_teacher, soft_targets
from vkd_pyro.training.distributed import say
from vkd_pyro.training.evaluate import auc_metrics, predict_split, report, teacher_split
from vkd_pyro.training.logger import TrainingLogger
from vkd_pyro.training.memory import check_memory
from vkd_pyro.training.provenance import as_comment, provenance
from vkd_pyro.training.resume import (
    RANK_SEED_STRIDE,
    LoopState,
    locate,
    restore,
    restore_rng,
    resume_check,
    save_resume,
    starts_over,
    write_history,
)
from vkd_pyro.training.run_folder import add_note, check_writable, open_run, open_run_id, stamp_metrics
from vkd_pyro.training.stops import FiniteWatch, SignalFlag, agreed_signal

# config.yaml's comment until the data is prepared (then: vkd_pyro.training.provenance.as_comment).
STARTED = "# the run's config, written when it started; what produced it follows once its data is ready\n"


def train_loader(split: PairedSplit, config: Config, epoch: int, start: int = 0,
                 ctx: Optional[distributed.DistContext] = None, pin_memory: bool = False) -> DataLoader:
    """The training batches of `epoch` from global batch `start` on, this process's share of each.

    The order is a function of (seed, epoch) (vkd_pyro.data.sampling): shuffled, and with reports
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
    """One SVI step on this process's share of a global batch; returns (terms (len(terms),) of the global
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


def fit(config: Config, out_dir: Path, progress: Optional[bool] = None, resume: bool = False,
        overwrite: bool = False, trust_code: bool = False) -> dict:
    """Train as `config` says, write the run folder, and return the test metrics (`trust_code`: a
    kd teacher run whose config names code by an import path may be loaded).

    The folder belongs to this run (vkd_pyro.training.run_folder): its lock is held while training
    writes it, run.json records the run id and how the run ended, and the id is written into
    checkpoint.pt, last.pt and metrics.json. A folder that holds another run's files is refused,
    unless `overwrite` (move them into `<out_dir>/.replaced-<time>/`) or `resume`.

    resume=True continues the run in `out_dir` from its resume state last.pt: weights, optimizer,
    random generators, epoch, step within the epoch and the KL annealing position, so that an
    interrupted and resumed run ends with the same history and metrics as an uninterrupted one.

    Under torchrun (WORLD_SIZE > 1) each process trains on its share of every global batch through
    DistributedDataParallel; only rank 0 writes files (and holds the folder). SIGINT/SIGTERM raise
    :class:`~vkd_pyro.errors.Interrupted` (in the loop after writing last.pt; before it, with
    config.yaml written, so that `--resume` starts the run from the beginning); a NaN or infinite loss
    term raises :class:`~vkd_pyro.errors.TrainingDiverged` and leaves the checkpoints as they were. A
    write the file system refuses (a full disk) is an OSError naming the file, noted with the command
    that continues the run.

    A resume is checked before the folder is written (`vkd_pyro.training.resume.resume_check`): a
    refusal (a damaged last.pt, a config.yaml that no longer matches the weights) leaves every file
    as it was; a finished run says so in one line, changes nothing and returns its metrics.json.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite: give one (continue the run, or replace it)")
    objective = check_config(config)  # before any data is read
    if objective.distils:
        check_teacher(config, trust_code)  # its folder and data, before this run's folder is claimed
    check_writable(config.resolved_cache_dir(), "cache_dir")
    out_dir = Path(out_dir)
    ctx, device = distributed.init_from_env(resolve_device(config.device))
    # the validation and test reports run Algorithm 2 on batches of train.eval_batch_size with S samples
    check_memory(config, config.train.eval_batch_size, config.inference.test_samples, device,
                 "train.eval_batch_size", "inference.test_samples")
    try:
        with ExitStack() as stack:
            stop = stack.enter_context(SignalFlag(partial(_interrupted, out_dir)))
            with stop.deferred():  # the folder is claimed and config.yaml written whatever arrives meanwhile
                refusal = done = None
                if ctx.is_main:
                    try:  # a resume is checked (last.pt, config.yaml) before the folder is written
                        check = (lambda: resume_check(out_dir, config)) if resume else None
                        run = stack.enter_context(open_run(out_dir, "resume" if resume else
                                                           "overwrite" if overwrite else "new", check))
                        done = run.nothing_to_do
                    except UserError as exc:
                        refusal = str(exc)
                outcomes = distributed.all_gather_objects((refusal, done))
                refusal = next((r for r, _ in outcomes if r), None)
                if refusal:  # every process stops alike
                    raise UserError(refusal)
                done = next((d for _, d in outcomes if d), None)
                if ctx.is_main and not resume:  # from now on, `--resume` finds the run's config
                    save_config(config, out_dir / "config.yaml", STARTED)
            if done:  # a finished run: nothing is written
                say(done)
                metrics = out_dir / "metrics.json"
                return json.loads(metrics.read_text()) if ctx.is_main else {}
            try:
                # Pyro's argument checks read values back to the host at every step (a GPU sync): off.
                stack.enter_context(pyro.validation_enabled(False))
                stack.enter_context(_run_log(out_dir, ctx))
                trainer = Trainer(config, out_dir, ctx, device, progress, resume, objective, trust_code, stop=stop)
                warn_undefined_auc(trainer.data.splits["validation"], config)
                if ctx.is_main:
                    run.training = True  # a failure from here on is the run's (before: the folder is put back)
                result = trainer.fit()
                if ctx.is_main:
                    stamp_metrics(out_dir, run.run_id)
                    run.finish()
            except OSError as exc:
                if exc.errno in WRITE_REFUSED and exc.filename is not None:
                    fix = "make room" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
                    add_note(exc, f"{fix}, then continue the run with: vkd-pyro train --resume "
                                  f"{shlex.quote(str(out_dir))}")
                raise
            return {**result, "run_id": run.run_id} if ctx.is_main else result
    finally:
        distributed.shutdown()


def _interrupted(out_dir: Path, signum: int) -> Interrupted:
    """What a signal raises outside the training loop (vkd_pyro.training.stops): the line with the
    command that resumes the run, and where it goes on from."""
    goes_on = ("it goes on from its last.pt" if (out_dir / "last.pt").is_file()
               else "no checkpoint yet: it starts from the beginning")
    return Interrupted(f"interrupted by {signal.Signals(signum).name} ({goes_on}); resume with: "
                       f"vkd-pyro train --resume {shlex.quote(str(out_dir))}", signum)


@contextmanager
def _run_log(out_dir: Path, ctx: distributed.DistContext):
    """run.log in the run folder (rank 0), for the whole run."""
    if not ctx.is_main:
        yield
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with logs.run_log(out_dir):
        yield


class Trainer:
    """One training run: its data, module, optimizer, schedule, loop position and files.

    `fit()` runs the epochs (each: SVI steps, then validation, history, checkpoints, early stopping)
    and the test report. Every sync point (`_check`) looks for a diverged loss, updates the progress
    bar and honours an agreed SIGINT/SIGTERM by writing last.pt and raising `Interrupted`.
    """

    def __init__(self, config: Config, out_dir: Path, ctx: distributed.DistContext, device: torch.device,
                 progress: Optional[bool] = None, resume: bool = False, objective=None, trust_code: bool = False,
                 *, stop: SignalFlag):
        self.started = time.perf_counter()
        self.config, self.out_dir, self.ctx, self.device = config, out_dir, ctx, device
        self.objective = objective or check_config(config)
        self.trust_code = trust_code  # a kd teacher that names code by an import path may run it
        self.terms = self.objective.terms
        self.term_names = tuple(t.name for t in self.terms)
        self.state = load_resume_state(out_dir) if resume and not starts_over(out_dir) else None
        if resume and self.state is None:  # stopped before its first checkpoint
            say(f"{out_dir}: no resume state yet: training run {open_run_id(out_dir)} from the beginning")
        self.paths = {"history": out_dir / "history.csv", "last": out_dir / "last.pt",
                      "best": out_dir / "checkpoint.pt"}
        tr = config.train
        self.show = (tr.progress if progress is None else progress) and ctx.is_main
        self.sync_every = 1 if device.type == "cpu" else tr.log_every
        self.data = self._prepare_data()
        self.module = self._build_module()
        self.optimizer = adam(self.module, tr.lr, tr.weight_decay)
        self.train_split = self.data.splits["train"]
        self.T = len(global_batches(self.train_split, config, 1, ctx.world_size))
        if self.T == 0:
            raise UserError(f"train.batch_size: {tr.batch_size} is smaller than the {ctx.world_size} processes")
        self.schedule = KLSchedule(config.inference.annealing, self.T, config.inference.guide_warmup_epochs)
        if self.schedule.warning():
            say(self.schedule.warning())
        self.loop, self.epoch_sums = LoopState(), torch.zeros(len(self.terms), device=device)
        if self.state is not None:
            self.loop, self.epoch_sums = restore(self.state, self.module, self.optimizer, config, out_dir, device)
        self.net = self._distributed_net()
        if self.state is not None:
            restore_rng(self.state, config, ctx, self.loop)
        elif ctx.enabled:  # the same initial weights (DDP copies rank 0's anyway), different draws
            pyro.set_rng_seed(config.seed + RANK_SEED_STRIDE * ctx.rank)
        if ctx.is_main:
            write_history(self.paths["history"], self.terms, self.loop.history)
        self.logger = TrainingLogger(out_dir, tr.tensorboard and ctx.is_main, start_step=self.loop.global_step)
        self.watch = FiniteWatch(device, self.terms, self.loop.global_step)
        self.step = TrainStep(self.net, self.module, self.optimizer, tr.grad_clip, ctx)
        self.saved_at = self.started if self.state is None else time.perf_counter()
        self.stop = stop
        self.bar = None

    def _prepare_data(self):
        config, ctx = self.config, self.ctx
        if ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        pyro.set_rng_seed(config.seed)
        with distributed.main_process_first():  # rank 0 fills the caches, the others read them
            data = prepare_data(config, with_reports=self.objective.reads_reports, device=self.device)
        for note in data.notes:
            say(note)
        if len(data.splits["train"]) == 0 or len(data.splits["validation"]) == 0:
            raise UserError("data: the train or validation split is empty (use more reports or change data.split)")
        self.provenance = provenance(data)
        if ctx.is_main:
            save_config(config, self.out_dir / "config.yaml", as_comment(self.provenance))
        return data

    def _build_module(self) -> VKDModule:
        config, ctx, device = self.config, self.ctx, self.device
        module, message = initial_module(config, self.data.dims, fine_tune=self.state is None)
        module = module.to(device)
        if message:  # fine-tuning: the model.* weights of another run that match
            say(message)
        if self.objective.distils:  # the teacher's tempered probabilities, once (vkd_pyro.training.distillation)
            module.set_soft_targets(soft_targets(config, self.data, device, self.trust_code))
            say(f"kd: soft targets of teacher {config.inference.kd.teacher} for {len(self.data.splits['train'])} "
                f"training records (T = {config.inference.kd.temperature}, alpha = {config.inference.kd.alpha})")
        if config.train.sync_batchnorm and ctx.enabled:
            if device.type != "cuda":
                raise UserError("train.sync_batchnorm: synchronised batch norm needs GPUs (device=cuda)")
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        say(f"{self.objective.describe()}; "
            f"{sum(p.numel() for p in module.parameters() if p.requires_grad):,} trainable parameters on {device}"
            + (f" x {ctx.world_size} processes ({ctx.backend})" if ctx.enabled else ""))
        return module

    def _distributed_net(self) -> torch.nn.Module:
        if not self.ctx.enabled:
            return self.module
        device = self.device
        return DistributedDataParallel(self.module, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=self.objective.find_unused_parameters)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        with self.stop.deferred():  # a signal is acted on at the next sync point (`_check`)
            while not self.loop.finished and self.loop.epoch <= self.config.train.max_epochs:
                epoch_start = time.perf_counter()
                self._train_epoch()
                self._end_epoch(time.perf_counter() - epoch_start)
        return self._test()

    def _train_epoch(self) -> None:
        loop, tr, T = self.loop, self.config.train, self.T
        batches = global_batches(self.train_split, self.config, loop.epoch, self.ctx.world_size)
        loader = train_loader(self.train_split, self.config, loop.epoch, loop.step_in_epoch, self.ctx,
                              pin_memory=self.device.type == "cuda")
        self.net.train()
        self.bar = tqdm(total=T, initial=loop.step_in_epoch, desc=f"epoch {loop.epoch}", leave=False,
                        disable=not self.show, file=sys.stderr)
        for batch, global_batch in zip(loader, batches[loop.step_in_epoch:]):
            loop.step_in_epoch += 1
            loop.global_step += 1
            beta = self.schedule(loop.step_in_epoch, loop.epoch)
            terms, grad_norm = self.step(batch.to(self.device), beta, len(global_batch))
            self.epoch_sums += terms
            loop.beta_sum += beta
            self.watch.observe(terms, grad_norm)
            self.logger.step(StepTerms(dict(zip(self.term_names, terms.unbind(0))), beta))
            self.bar.update(1)
            if tr.stop_after_steps == loop.global_step:
                self.stop.request(signal.SIGTERM)
            checkpoint_now = bool(tr.checkpoint_every) and loop.global_step % tr.checkpoint_every == 0
            if (loop.global_step % self.sync_every == 0 or loop.step_in_epoch == T or checkpoint_now
                    or loop.global_step == tr.stop_after_steps):
                self._check(terms)
                if checkpoint_now:
                    self._save_last()
        self.bar.close()
        self._check(None)  # a resumed epoch whose steps were all done before has had none

    def _end_epoch(self, seconds_training: float) -> None:
        """Validation, history, the best checkpoint, early stopping (the paper's relative tolerance), last.pt."""
        loop, tr, config = self.loop, self.config.train, self.config
        started = time.perf_counter()
        means = dict(zip(self.term_names, (self.epoch_sums / max(loop.step_in_epoch, 1)).tolist()))
        beta = loop.beta_sum / max(loop.step_in_epoch, 1)
        val_split = self.data.splits["validation"]
        val_auc = self._validation_auc(val_split)
        seconds = seconds_training + time.perf_counter() - started
        loop.history.append([str(loop.epoch), f"{beta:.6g}"] + [f"{means[k]:.6g}" for k in self.term_names]
                            + [f"{val_auc:.6g}", f"{seconds:.2f}"])
        if self.ctx.is_main:
            write_history(self.paths["history"], self.terms, loop.history)
        self.logger.epoch(loop.epoch, {**means, "beta": beta, "val_macro_auc": val_auc, "seconds": seconds})
        mark = ""
        if val_auc > loop.best_auc or loop.best_epoch == 0:
            loop.best_auc, loop.best_epoch, mark = val_auc, loop.epoch, " *"
            if self.ctx.is_main:
                save_atomic({"module": self.module.state_dict(), "epoch": loop.epoch, "val_macro_auc": val_auc,
                             "text_dims": self.data.dims, "config": config.to_dict()}, self.paths["best"])
        if val_auc > loop.reference_auc * (1 + tr.tolerance):  # AUCs are >= 0; starts at -inf
            loop.reference_auc, loop.wait = val_auc, 0
        elif loop.epoch > config.inference.guide_warmup_epochs:  # warm-up epochs do not count towards patience
            loop.wait += 1
        shown = "  ".join(f"{t.label} {means[t.name]:.4f}" for t in self.objective.reported_terms)
        say(f"epoch {loop.epoch:3d}  {shown}  beta {beta:.2f}  val macro AUC {val_auc:.4f}  {seconds:.1f}s{mark}")
        if loop.wait >= tr.patience:
            say(f"early stop: no validation gain above {tr.tolerance:.0%} for {loop.wait} epochs; "
                f"best epoch {loop.best_epoch}")
            loop.finished = loop.stopped_early = True
        loop.epoch, loop.step_in_epoch, loop.beta_sum = loop.epoch + 1, 0, 0.0
        self.epoch_sums.zero_()
        loop.finished = loop.finished or loop.epoch > tr.max_epochs
        self._save_last()
        self._check(None)  # a signal during validation: last.pt is written, stop here

    def _test(self) -> dict:
        """The test report (`evaluate.report`, its Monte Carlo draws seeded by the run's seed, so that
        `vkd-pyro evaluate` and `Run.evaluate` give the same figures): from images, and with a teacher
        q(y|z_T) its block `teacher` too, from the test reports (for an objective without an image
        side, those are the main numbers)."""
        distributed.barrier()  # checkpoint.pt is written
        self.module.load_state_dict(load_checkpoint(self.paths["best"])["module"])
        extra = {"best_epoch": self.loop.best_epoch, "val_macro_auc": self.loop.best_auc,
                 "train_seconds": self.loop.seconds + (time.perf_counter() - self.saved_at),
                 "skipped": self.data.dataset.skipped, **self.logger.close(), "provenance": self.provenance}
        result = report(self.objective, self.data, self.out_dir, "test", self.config.inference.test_samples,
                        self._predictions, self._teacher, self.device, extra)
        distributed.barrier()  # no process leaves while rank 0 writes
        return result

    # ------------------------------------------------------------------ sync points and state

    def _save_last(self) -> None:
        now = time.perf_counter()
        self.loop.seconds += now - self.saved_at
        self.saved_at = now
        save_resume(self.paths["last"], self.module, self.optimizer, self.loop, self.epoch_sums, self.T, self.config,
                    self.data.dims, self.ctx)

    def _check(self, terms: Optional[torch.Tensor]) -> None:
        """A sync point: divergence (on every process alike), progress, an agreed stop."""
        loop, paths = self.loop, self.paths
        bad = self.watch.read()
        if bad is not None:
            bad_step, names = bad
            epoch, in_epoch = locate(bad_step, loop, self.T)
            raise TrainingDiverged(
                f"training diverged at epoch {epoch}, step {in_epoch} (step {bad_step} in all): "
                f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} not finite; "
                + (f"{paths['last']} keeps the last good state ({loop.saved})" if loop.saved
                   else "no resume state was written yet")
                + (f" and {paths['best']} the best weights" if loop.best_epoch else "")
                + " (lower train.lr or set train.grad_clip)")
        if terms is not None and self.show:
            values = dict(zip(self.term_names, terms.tolist()))
            self.bar.set_postfix({t.short: f"{values[t.name]:.3f}" for t in self.objective.reported_terms})
        signum = agreed_signal(self.stop, self.device, self.ctx)
        if signum is not None:
            if self.bar is not None:
                self.bar.close()
            self._save_last()
            distributed.barrier()
            name = signal.Signals(signum).name
            say(f"{name}: stopped at epoch {loop.epoch}, step {loop.step_in_epoch} of {self.T}; "
                f"resume state written to {paths['last']}")
            raise Interrupted(f"interrupted by {name} at epoch {loop.epoch}, step {loop.step_in_epoch} of {self.T}; "
                              f"resume with: vkd-pyro train --resume {shlex.quote(str(self.out_dir))}", signum)

    def _validation_auc(self, split) -> float:
        """The validation macro AUC: from images (Algorithm 2), or for text_only the teacher's on the reports."""
        if self.objective.predicts_from == "reports":
            probs, _, labels = self._teacher(split)
        else:
            probs, labels = self._predictions(split)
        return _macro_auc(probs, labels, split, self.config)

    def _teacher(self, split) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The teacher's (mean probabilities, per-class NLL, labels) of a whole split from its reports
        (`evaluate.teacher_split`), sharded over processes like `_predictions`."""
        distributed.broadcast_buffers(self.module)
        config = self.config

        def predict(part):
            return teacher_split(self.module, part, config.inference.test_samples, config.train.eval_batch_size,
                                 self.device, num_workers=config.data.num_workers)

        return distributed.gather_predictions(predict, split, len(CLASSES))

    def _predictions(self, split) -> tuple[np.ndarray, np.ndarray]:
        """(mean probabilities, labels) of a whole split from images alone; with several processes,
        each predicts a shard (with rank 0's batch-norm statistics) and all receive the whole."""
        distributed.broadcast_buffers(self.module)
        config = self.config

        def predict(part):
            return predict_split(self.module, part, config.inference.test_samples, config.train.eval_batch_size,
                                 self.device, num_workers=config.data.num_workers)

        probs, _, labels = distributed.gather_predictions(predict, split, len(CLASSES))
        return probs, labels


def warn_undefined_auc(split, config: Config) -> None:
    """One warning line naming the classes whose validation AUC is undefined (a single label value
    among the split's known labels): the validation macro AUC, early stopping and the best
    checkpoint use the other classes (and are nan when none is left)."""
    labels = np.asarray(split.base.labels)[split.indices]
    mask = split_label_mask(split)
    known = np.ones(labels.shape, bool) if mask is None else np.asarray(mask) > 0
    scored = config.data.eval_classes
    undefined = [name for c, name in enumerate(CLASSES) if (scored is None or name in scored)
                 and not 0 < labels[known[:, c], c].sum() < known[:, c].sum()]
    if undefined:
        left = "no class left: the validation macro AUC is undefined (nan)" if len(undefined) == len(
            scored or CLASSES) else "the validation macro AUC averages the others"
        say(f"warning: the validation split ({len(labels)} records) has one label value only for "
            f"{', '.join(undefined)}: their AUC is undefined; {left} (use more reports or change data.split)")


def _macro_auc(probs: np.ndarray, labels: np.ndarray, split, config: Config) -> float:
    """The macro AUC over the classes the split's labels define (nan when none)."""
    value = auc_metrics(labels, probs, CLASSES, split_label_mask(split), config.data.eval_classes)["macro_auc"]
    return float("nan") if value is None else value
