"""Sweeps: train a grid of configurations over seeds, one ordinary run folder each, and tabulate them.

`vkd-pyro sweep --config FILE --grid key=v1,v2 [--grid ...] --seeds N --out DIR [key=value ...]`:

- every combination of the grid values, for seeds base, base+1, ..., base+N-1 (base = the config's
  `seed`), is trained by :func:`vkd_pyro.training.loop.fit` into ``DIR/runs/<key=value,...>-seed<k>/``;
- a run folder that already holds a config.yaml is used again only when that resolved config equals
  the one the sweep would train (`cache_dir`, `train.progress`, `train.tensorboard` aside); otherwise
  the sweep refuses before any run starts, naming the first keys that differ, or with `--overwrite`
  moves that folder's files into `<folder>/.replaced-<time>/` and trains it again;
- a run is *finished* when run.json says so and metrics.json carries its run id
  (vkd_pyro.training.run_folder). A sweep started again skips the finished runs and trains the others;
  an interrupted one continues from its resume state last.pt when it has one (`fit(resume=True)`),
  else starts afresh (its wall time then counts only the resumed part);
- the runs train one after another in this process, side by side on `--jobs N` local worker
  processes with a share of the cores' threads each, or as cluster jobs (`--launcher submitit`):
  :mod:`vkd_pyro.analysis.launch`; each job trains and evaluates its run (:func:`train_planned`);
- after each run the module is evaluated once more on the test split (:func:`vkd_pyro.analysis.diagnostics.
  summarize`: the objective's terms at beta = 1, log p(y|x_I) by Monte Carlo over the prior, the ECE; with a
  guide, the active units of q(z_T | x_T)) and the result is kept in the run folder as ``sweep_run.json``
  (with the wall time of the run);
- ``DIR/sweep.csv`` (one row a run) and ``DIR/sweep.md`` (mean and std over seeds per grid point) are
  rebuilt from the run folders after every run, ``DIR/sweep.png`` at the end; each file is replaced
  atomically. Their notes say what the runs were from the configs recorded in the run folders, never
  from the command line.

Grid values are YAML, as in dotted overrides; a value that itself holds commas is bracketed
(``model.hidden=[16,16],[32]``).

The parts: the plan (:mod:`vkd_pyro.analysis.grid`), what each finished run gets
(:mod:`vkd_pyro.analysis.sweep_run`), the tables and figure (:mod:`vkd_pyro.analysis.sweep_tables`);
this module trains them.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from vkd_pyro.analysis.grid import Axis, is_finished, parse_baseline, plan
from vkd_pyro.analysis.launch import Job, LocalLauncher
from vkd_pyro.analysis.sweep_run import RUN_SUMMARY, evaluate_run
from vkd_pyro.analysis.sweep_tables import write_outputs
from vkd_pyro.config import load_config
from vkd_pyro.errors import UserError
from vkd_pyro.files import write_json, write_text
from vkd_pyro.training.distributed import say
from vkd_pyro.training.loop import fit as train_fit


@dataclass
class SweepResult:
    rows: list
    axes: list
    ran: list
    skipped: list
    failed: dict
    out_dir: Path


def train_planned(task: tuple, fit: Optional[Callable] = None) -> dict:
    """Train one planned run and evaluate it: what a launcher's job does (in this process or a worker).

    `task` = (config path, PlannedRun, progress). An interrupted run continues from its resume
    state last.pt where training wrote one (`fit(resume=True)`); a finished one gets sweep_run.json
    (:func:`evaluate_run`). Returns {"error": None, "wall_seconds": training seconds}, or {"error":
    message} for a UserError (e.g. divergence), which leaves the run unfinished.
    """
    config_path, run, progress = task
    fit = fit or train_fit
    resume = (run.folder / "last.pt").is_file()
    config = load_config(config_path, run.overrides)
    started = time.perf_counter()
    try:
        # a folder left by an attempt that stopped before last.pt (a failed start) is trained afresh
        fit(config, run.folder, progress=progress, **({"resume": True} if resume else {"overwrite": True}))
    except UserError as exc:
        return {"error": str(exc)}
    wall = time.perf_counter() - started
    if not is_finished(run.folder):
        return {"error": "training wrote no metrics.json"}
    evaluate_run(run.folder, wall)
    return {"error": None, "wall_seconds": wall}


def run_sweep(config_path: str, axes: Sequence[Axis], seeds: int, out_dir, overrides: Sequence[str] = (),
              progress: Optional[bool] = False, fit: Optional[Callable] = None,
              say: Callable[[str], None] = say, overwrite: bool = False, baseline: Optional[str] = None,
              launcher=None) -> SweepResult:
    """Train the planned runs that are not finished, then (re)write sweep.csv, sweep.md and sweep.png.

    `launcher` (:mod:`vkd_pyro.analysis.launch`) trains them: one after another in this process
    (the default, LocalLauncher(1)), on N local workers with a thread share each, or as submitit
    jobs; each runs :func:`train_planned`. `fit` defaults to :func:`vkd_pyro.training.loop.fit`
    (tests pass a counting wrapper; for workers it must pickle). A run that fails (a UserError such
    as divergence, or a worker that died) is reported, its message kept in its error.txt, and left
    unfinished; the others go on; a sweep started again tries it again. The tables are rewritten as
    each run ends, the plot at the end. `baseline` (`--baseline key=value`, a grid point) adds each
    row's macro-AUC difference to it to sweep.md.
    """
    out_dir = Path(out_dir)
    runs = plan(config_path, axes, seeds, out_dir, overrides, overwrite)
    point = parse_baseline(baseline, axes)  # a bad --baseline is refused before any run
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    title = f"Sweep of {config_path}"
    write_json(out_dir / "sweep.json", {"config": str(config_path), "grid": {a.key: a.texts for a in axes},
                                        "seeds": seeds, "overrides": list(overrides)})
    launcher = launcher or LocalLauncher(1)
    ran, skipped, failed, jobs, wheres = [], [], {}, [], {}
    for i, run in enumerate(runs, 1):
        where = wheres[run.name] = f"[{i}/{len(runs)}] {run.name}"
        if is_finished(run.folder):
            skipped.append(run.name)
            if not (run.folder / RUN_SUMMARY).is_file():
                evaluate_run(run.folder)
            say(f"{where}: finished before, skipped")
            continue
        action = "resuming from last.pt" if (run.folder / "last.pt").is_file() else "training"
        jobs.append(Job(run.name, (str(config_path), run, progress), run.folder, f"{where}: {action}"))
    folders = {job.name: job.folder for job in jobs}

    def done(name: str, record: dict) -> None:
        """A job ended: its launch record's error (the worker died) or its result's (a UserError)."""
        error = record.get("error") or (record.get("result") or {}).get("error")
        if error:
            failed[name] = error
            write_text(folders[name] / "error.txt", error + "\n")
            say(f"{wheres[name]}: failed: {error}")
            return
        (folders[name] / "error.txt").unlink(missing_ok=True)
        ran.append(name)
        write_outputs(runs, axes, out_dir, title, plot=False, baseline=point)  # so far; the plot at the end

    if jobs:
        say(f"sweep: {len(jobs)} run(s) to train: {launcher.describe()}")
        work = train_planned if fit is None else functools.partial(train_planned, fit=fit)
        launcher.run(jobs, work, done, say)
    rows = write_outputs(runs, axes, out_dir, title, baseline=point)
    say(f"sweep: {len(ran)} trained, {len(skipped)} finished before, {len(failed)} failed; "
        f"wrote {out_dir}/sweep.csv, sweep.md" + (", sweep.png" if rows else ""))
    return SweepResult(rows, list(axes), ran, skipped, failed, out_dir)
