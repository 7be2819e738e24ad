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
  summarize`: the ELBO terms at beta = 1, log p(y|x_I) by Monte Carlo over the prior, the ECE; with a
  guide, the active units of q(z_T | x_T)) and the result is kept in the run folder as ``sweep_run.json``
  (with the wall time of the run);
- ``DIR/sweep.csv`` (one row a run) and ``DIR/sweep.md`` (mean and std over seeds per grid point) are
  rebuilt from the run folders after every run, ``DIR/sweep.png`` at the end; each file is replaced
  atomically. Their notes say what the runs were from the configs recorded in the run folders, never
  from the command line.

Grid values are YAML, as in dotted overrides; a value that itself holds commas is bracketed
(``model.hidden=[16,16],[32]``).
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from vkd_pyro.analysis.compare import pooled_bootstrap
from vkd_pyro.analysis.diagnostics import ACTIVE_THRESHOLD, collapse_report, latent_statistics, summarize
from vkd_pyro.analysis.launch import Job, LocalLauncher
from vkd_pyro.analysis.runs import load_run
from vkd_pyro.config import load_config, parse_value, split_assignment
from vkd_pyro.data.prepare import prepare_data
from vkd_pyro.errors import UserError
from vkd_pyro.files import atomic_path, write_json, write_text
from vkd_pyro.objectives import objective_for
from vkd_pyro.training import distributed
from vkd_pyro.training.distributed import say
from vkd_pyro.training.loop import fit as train_fit
from vkd_pyro.training.predictions import read_predictions
from vkd_pyro.training.run_folder import config_differences, flatten, folder_lock, move_aside, read_record, run_entries

# Columns of sweep.csv after the grid keys and the seed: (column, label in sweep.md, format); between
# the AUCs and the rest, the test-split terms of the runs' objectives (`term_columns`).
AUC_COLUMNS = [
    ("macro_auc", "macro AUC", "{:.3f}"),
    ("micro_auc", "micro AUC", "{:.3f}"),
]
EVALUATION_COLUMNS = [
    ("log_lik", "log p(y\\|x)", "{:.3f}"),  # the pipe escaped: a markdown table cell
    ("ece", "ECE", "{:.3f}"),
    ("teacher_auc", "teacher AUC", "{:.3f}"),
    ("active_units", "active units", "{:.1f}"),
    ("wall_seconds", "seconds", "{:.1f}"),
    ("steps_per_second", "steps/s", "{:.2f}"),
    ("best_epoch", "best epoch", "{:.1f}"),
]
RUN_SUMMARY = "sweep_run.json"
IS_SAMPLES = 64  # K for the log p(y|x_I) column (prior proposal)
NO_EFFECT_KEYS = ("cache_dir", "train.progress", "train.tensorboard")  # where and how visibly a run computes


@dataclass
class Axis:
    """One grid key and its values, as written (`texts`) and as parsed YAML (`values`)."""
    key: str
    texts: list[str]
    values: list = field(default_factory=list)


@dataclass
class PlannedRun:
    name: str
    assignment: dict  # key -> value text
    seed: int
    overrides: list[str]
    folder: Path
    config: dict = field(default_factory=dict)  # the resolved config the sweep trains (Config.to_dict())
    base: dict = field(default_factory=dict)  # the config file's, without overrides
    source: str = ""  # the config file


def split_values(text: str) -> list[str]:
    """Split `v1,v2,...` at the commas outside brackets and quotes."""
    parts, depth, quote, current = [], 0, None, []
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    parts.append("".join(current).strip())
    return parts


def parse_grid(specs: Sequence[str]) -> list[Axis]:
    """`key=v1,v2,...` specs to axes; a repeated key or an empty value is a UserError."""
    axes, seen = [], set()
    for spec in specs:
        assignment = split_assignment(spec)
        if assignment is None:
            raise UserError(f"--grid {spec}: write key=value1,value2,...")
        key, raw = assignment
        if key == "seed":
            raise UserError("--grid seed=...: use --seeds N for seeds")
        if key in seen:
            raise UserError(f"--grid {key}: given twice")
        seen.add(key)
        texts = split_values(raw)
        if any(t == "" for t in texts):
            raise UserError(f"--grid {spec}: an empty value")
        if len(set(texts)) != len(texts):
            raise UserError(f"--grid {spec}: a value is repeated")
        values = [parse_value(t) for t in texts]
        axes.append(Axis(key, texts, values))
    return axes


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"


def run_name(assignment: dict, seed: int) -> str:
    """`key=value,key=value-seed<k>` (values made safe for a file name), `seed<k>` without a grid."""
    parts = ",".join(f"{key}={_safe(text)}" for key, text in assignment.items())
    return f"{parts}-seed{seed}" if parts else f"seed{seed}"


def plan(config_path: str, axes: Sequence[Axis], seeds: int, out_dir: Path,
         overrides: Sequence[str] = (), overwrite: bool = False) -> list[PlannedRun]:
    """Every (grid point, seed) as a PlannedRun; every config is built (validated) before any run starts.

    A run folder that holds a config.yaml whose resolved config differs from the one planned for it
    (NO_EFFECT_KEYS aside) is a UserError naming the folder and the first keys that differ; with
    `overwrite`, once every folder is checked, its files are moved into `<folder>/.replaced-<time>/`
    (vkd_pyro.training.run_folder.move_aside) so that the sweep trains it again.
    """
    if seeds < 1:
        raise UserError(f"--seeds: must be >= 1, got {seeds}")
    base = load_config(config_path, overrides).seed
    file_config = load_config(config_path).to_dict()
    runs, names = [], set()
    for combo in itertools.product(*[axis.texts for axis in axes]):
        assignment = {axis.key: text for axis, text in zip(axes, combo)}
        for k in range(seeds):
            seed = base + k
            extra = list(overrides) + [f"{key}={text}" for key, text in assignment.items()] + [f"seed={seed}"]
            config = load_config(config_path, extra)  # raises a one-line ConfigError for a bad key or value
            name = run_name(assignment, seed)
            if name in names:
                raise UserError(f"--grid: two grid points give the same run folder name {name}")
            names.add(name)
            runs.append(PlannedRun(name, assignment, seed, extra, Path(out_dir) / "runs" / name, config.to_dict(),
                                   file_config, str(config_path)))
    replace = []
    for run in runs:
        differences = _differences(run)
        if differences and not overwrite:
            raise UserError(f"{run.folder}: holds a run with other settings ({'; '.join(differences[:3])}"
                            f"{'; ...' if len(differences) > 3 else ''}); use another --out, or --overwrite to "
                            f"train it again (its files are moved into {run.folder}/.replaced-<time>/)")
        if differences:
            replace.append(run)
    for run in replace:
        with folder_lock(run.folder, create=False):
            target = move_aside(run.folder, run_entries(run.folder))
        distributed.say(f"--overwrite: {run.name} had other settings; moved its files into {target}")
    return runs


def _differences(run: PlannedRun) -> list[str]:
    """How the config recorded in the run's folder differs from the planned one (empty: none recorded)."""
    path = run.folder / "config.yaml"
    if not path.is_file():
        return []
    recorded = {k: v for k, v in flatten(load_config(path).to_dict()).items() if k not in NO_EFFECT_KEYS}
    wanted = {k: v for k, v in flatten(run.config).items() if k not in NO_EFFECT_KEYS}
    return config_differences(recorded, wanted)


def is_finished(folder: Path) -> bool:
    """run.json says the run finished and metrics.json carries its run id (a folder written before
    run ids, without run.json: metrics.json alone)."""
    folder = Path(folder)
    path = folder / "metrics.json"
    if not path.is_file():
        return False
    record = read_record(folder)
    if record is None:
        return True
    if record.get("status") != "finished":
        return False
    try:
        return json.loads(path.read_text()).get("run_id") == record["run_id"]
    except (OSError, ValueError, AttributeError):
        return False


def recorded_notes(runs: Sequence[PlannedRun]) -> list[str]:
    """What the finished runs were, read from the config.yaml in their folders: the keys whose values
    differ between them (the grid and the seed) and the settings they share where the config file differs."""
    configs = [{k: v for k, v in flatten(load_config(r.folder / "config.yaml").to_dict()).items()
                if k not in NO_EFFECT_KEYS} for r in runs if is_finished(r.folder)]
    if not configs:
        return ["no finished runs yet"]
    keys = sorted(set().union(*configs))
    varying = {}
    for key in keys:
        values = list(dict.fromkeys(json.dumps(c.get(key), default=str) for c in configs))
        if len(values) > 1:
            varying[key] = values
    file_config = flatten(runs[0].base)
    shared = [f"{k}={json.dumps(configs[0].get(k), default=str)}" for k in keys
              if k not in varying and configs[0].get(k) != file_config.get(k)]
    return [f"{len(configs)} finished runs; their settings as recorded in each run folder's config.yaml:",
            "varying: " + ("; ".join(f"{k} = {', '.join(v)}" for k, v in varying.items()) or "(nothing)"),
            f"the same in all, unlike {runs[0].source}: " + (", ".join(shared) or "(nothing)")]


_PREPARED: dict = {}  # the last PreparedData evaluate_run used, under "data", and its "key"


def evaluate_run(folder: Path, wall_seconds: Optional[float] = None) -> dict:
    """Load a finished run, evaluate the sweep's extra metrics on its test split, write sweep_run.json."""
    run = load_run(str(folder), trust_code=True)  # plan() checked its config is the one the sweep was given
    objective = run.objective
    key = json.dumps([run.config.to_dict()[k] for k in ("data", "text_encoder", "cache_dir")]
                     + [objective.reads_reports], sort_keys=True, default=str)
    if _PREPARED.get("key") != key:  # the runs of a sweep mostly share their data: prepare it once
        _PREPARED.clear()
        _PREPARED.update(key=key, data=prepare_data(run.config, with_reports=objective.reads_reports))
    data = _PREPARED["data"]
    metrics = json.loads((folder / "metrics.json").read_text())
    if wall_seconds is None:  # a run finished by an earlier, interrupted sweep: its training time
        wall_seconds = metrics.get("train_seconds")
    summary = {"wall_seconds": wall_seconds}
    # the diagnostics of the image model on the test split, where the objective's loss can be evaluated there
    if objective.test_elbo and objective.predicts_from == "images":
        result = summarize(run.module, data.splits["test"], run.config, run.device, is_samples=IS_SAMPLES,
                           with_guide=objective.has_guide)
        summary.update({"elbo": result["elbo"], "log_lik": result["log_p_y_given_x"]["prior_proposal"],
                        "is_samples": IS_SAMPLES, "ece": result["calibration"]["ece"],
                        "ece_bins": result["calibration"]["bins"]})
        if objective.has_guide:  # posterior collapse: the active units of q(z_T | x_T) on the test reports
            collapse = collapse_report(latent_statistics(run.module, data.splits["test"],
                                                         run.config.train.eval_batch_size, run.device, with_guide=True))
            summary.update(active_units=collapse["guide_active_units"], active_threshold=collapse["threshold"],
                           z_dim=collapse["z_dim"])
    write_json(folder / RUN_SUMMARY, summary)
    return summary


def term_columns(runs: Sequence[PlannedRun]) -> list[tuple[str, str, str]]:
    """The test-split terms of the finished runs' objectives (`Objective.terms`, each objective's
    order, the first run's first): sweep.csv columns named as the terms, labelled "test <label>"."""
    columns: dict = {}
    for run in runs:
        if is_finished(run.folder):
            config = load_config(run.folder / "config.yaml")
            for term in objective_for(config).terms:
                columns.setdefault(term.name, (term.name, f"test {term.label}", "{:.3f}"))
    return list(columns.values())


def _number(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value


def collect_rows(runs: Sequence[PlannedRun], axes: Sequence[Axis], terms: Sequence[tuple]) -> list[dict]:
    """One row per finished planned run, read from its folder (metrics.json, sweep_run.json); `terms`
    are the columns of :func:`term_columns` (NaN where a run's objective has no such term)."""
    rows = []
    for run in runs:
        if not is_finished(run.folder):
            continue
        metrics = json.loads((run.folder / "metrics.json").read_text())
        summary_path = run.folder / RUN_SUMMARY
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        elbo = summary.get("elbo", {})
        row = {axis.key: run.assignment[axis.key] for axis in axes}
        row.update(seed=run.seed, macro_auc=_number(metrics.get("macro_auc")),
                   micro_auc=_number(metrics.get("micro_auc")))
        row.update({name: _number(elbo.get(name)) for name, _, _ in terms})
        row.update(log_lik=_number(summary.get("log_lik")), ece=_number(summary.get("ece")),
                   teacher_auc=_number((metrics.get("teacher") or {}).get("macro_auc")),
                   active_units=_number(summary.get("active_units")),
                   wall_seconds=_number(summary.get("wall_seconds", metrics.get("train_seconds"))),
                   steps_per_second=_number(metrics.get("steps_per_second")),
                   best_epoch=_number(metrics.get("best_epoch")), run=run.name)
        rows.append(row)
    return rows


def metric_columns(terms: Sequence[tuple]) -> list[tuple[str, str, str]]:
    """sweep.csv's and sweep.md's metric columns: the AUCs, the objectives' test terms, the rest."""
    return AUC_COLUMNS + list(terms) + EVALUATION_COLUMNS


def write_csv(rows: Sequence[dict], axes: Sequence[Axis], path: Path, columns: Sequence[tuple]) -> None:
    names = [axis.key for axis in axes] + ["seed"] + [c for c, _, _ in columns] + ["run"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text(path, buffer.getvalue())


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std with n-1, n) over the finite values; std is nan for fewer than 2."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return math.nan, math.nan, 0
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return float(np.mean(finite)), std, len(finite)


def format_mean_std(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    """`mean ± std` (std over seeds, n-1); the mean alone for one value; `–` for none."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "–"
    return fmt.format(mean) + (" ± " + fmt.format(std) if n > 1 else "")


def aggregate(rows: Sequence[dict], axes: Sequence[Axis]) -> list[tuple[dict, list[dict]]]:
    """Rows grouped by grid point, in grid order: [(assignment, rows of its seeds)]."""
    groups = []
    for combo in itertools.product(*[axis.texts for axis in axes]):
        assignment = dict(zip([a.key for a in axes], combo))
        members = [r for r in rows if all(r[k] == v for k, v in assignment.items())]
        if members:
            groups.append((assignment, members))
    return groups


def parse_baseline(spec: Optional[str], axes: Sequence[Axis]) -> Optional[dict]:
    """`--baseline key=value[,key=value]` to a grid point {key: value text}; keys of the grid left out
    must have one value. UserError naming the option for a key not in the grid or a value not in it."""
    if not spec:
        return None
    point = {}
    for part in split_values(spec):
        assignment = split_assignment(part)
        if assignment is None:
            raise UserError(f"--baseline {spec}: write key=value (a grid point)")
        key, text = assignment[0], assignment[1].strip()
        axis = next((a for a in axes if a.key == key), None)
        if axis is None:
            raise UserError(f"--baseline {spec}: {key} is not a grid key ({', '.join(a.key for a in axes) or 'none'})")
        if text not in axis.texts:
            raise UserError(f"--baseline {spec}: {key}={text} is not in the grid ({', '.join(axis.texts)})")
        point[key] = text
    for axis in axes:
        if axis.key not in point:
            if len(axis.texts) > 1:
                raise UserError(f"--baseline {spec}: name a value of {axis.key} too ({', '.join(axis.texts)})")
            point[axis.key] = axis.texts[0]
    return point


def baseline_differences(rows: Sequence[dict], axes: Sequence[Axis], runs_dir: Path, baseline: dict,
                         n_boot: int = 2000) -> dict:
    """grid point (tuple of value texts, in axis order) -> the macro-AUC difference row - baseline
    (`vkd_pyro.analysis.compare.pooled_bootstrap` over the seeds both have, each run's
    predictions_test.npz), or a string saying why there is none. The baseline's own row is left out."""
    order = [a.key for a in axes]
    groups = {tuple(a[k] for k in order): members for a, members in aggregate(rows, axes)}
    base = {m["seed"]: runs_dir / m["run"] for m in groups.get(tuple(baseline[k] for k in order), [])}
    out = {}
    for point, members in groups.items():
        if point == tuple(baseline[k] for k in order):
            continue
        seeds = [m["seed"] for m in members if m["seed"] in base]
        if not seeds:
            out[point] = "no seed in common with the baseline"
            continue
        try:
            pairs, classes, evaluated = [], None, None
            for m in members:
                if m["seed"] not in base:
                    continue
                a, b = read_predictions(base[m["seed"]]), read_predictions(runs_dir / m["run"])
                classes, evaluated = a.classes, a.meta.get("eval_classes")
                pairs.append(((a.probs, a.labels, a.mask, a.record_ids), (b.probs, b.labels, b.mask, b.record_ids)))
            out[point] = pooled_bootstrap(pairs, classes, n_boot=n_boot, evaluated=evaluated)
        except UserError as exc:
            out[point] = str(exc)
    return out


def format_difference(comparison) -> str:
    """`+0.012 [-0.004, +0.027]` for a Comparison; `–` for a reason there is none."""
    if isinstance(comparison, str) or comparison is None:
        return "–"
    low, high = comparison.interval
    return f"{comparison.difference:+.3f} [{low:+.3f}, {high:+.3f}]"


def baseline_note(baseline: dict) -> str:
    point = ", ".join(f"{k} = {v}" for k, v in baseline.items())
    return (f"Δ macro AUC: this row minus the baseline ({point}) on the same test records, mean over the seeds "
            "both have, with its 95% paired-bootstrap interval (2000 replicates over test records, pooled over "
            "seeds; `vkd-pyro compare`). Rows evaluated on the reports (text_only) are compared on the same "
            "records and labels, but from another input.")


def format_markdown(rows: Sequence[dict], axes: Sequence[Axis], title: str, columns: Sequence[tuple],
                    notes: Sequence[str] = (), differences: Optional[dict] = None,
                    baseline: Optional[dict] = None) -> str:
    """sweep.md: a row per grid point (mean ± std over seeds); with `baseline`, a column of the
    macro-AUC difference to it (`differences` from :func:`baseline_differences`)."""
    lines = [f"# {title}", ""]
    if notes:
        lines += [f"{n}  " for n in notes] + [""]
    header = [axis.key for axis in axes] + ["seeds"] + [label for _, label, _ in columns[:1]]
    if baseline is not None:
        header.append("Δ macro AUC [95% CI]")
    header += [label for _, label, _ in columns[1:]]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for assignment, members in aggregate(rows, axes):
        cells = [assignment[a.key] for a in axes] + [str(len(members))]
        metrics = [format_mean_std([m[c] for m in members], fmt) for c, _, fmt in columns]
        cells.append(metrics[0])
        if baseline is not None:
            point = tuple(assignment[a.key] for a in axes)
            is_base = all(assignment[k] == v for k, v in baseline.items())
            cells.append("baseline" if is_base else format_difference((differences or {}).get(point)))
        cells += metrics[1:]
        lines.append("| " + " | ".join(cells) + " |")
    if baseline is not None:
        lines += ["", baseline_note(baseline)]
    lines += ["", "Mean ± std over seeds (sample std, n-1; the mean alone with one seed). Test split. "
              "test loss, image NLL, text NLL, KL, ...: the terms each run's objective records (minus Eq. 8 and its "
              "parts for vkd), per record at beta = 1, where its loss can be evaluated on the test records. "
              f"log p(y|x): Monte Carlo estimate over K={IS_SAMPLES} prior samples, nats per record. "
              "ECE: 10 equal-width bins over all (record, class) pairs. teacher AUC: macro AUC of q(y|z_T) on the test "
              "reports (metrics.json's teacher block). active units: latent dimensions d of q(z_T|x_T) with "
              f"Var_x E_q[z_d] > {ACTIVE_THRESHOLD} over the test reports (Burda et al. 2015). seconds: wall time of the run "
              "(training and test evaluation); steps/s: optimizer steps per second of training, "
              "validation left out.", ""]
    return "\n".join(lines)


SAMPLE_KEYS = ("num_particles", "prior_samples", "test_samples", "z_dim")


def _x_axis(axes: Sequence[Axis]) -> Optional[int]:
    numeric = [i for i, a in enumerate(axes)
               if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in a.values)]
    for i in numeric:
        if axes[i].key.rsplit(".", 1)[-1] in SAMPLE_KEYS:
            return i
    return numeric[0] if numeric else (0 if axes else None)


def plot_sweep(rows: Sequence[dict], axes: Sequence[Axis], path: Path, title: str = "") -> None:
    """Macro AUC, wall seconds and steps/s against the (first sample-count or numeric) grid key, one
    line per combination of the other keys, error bars = std over seeds."""
    panels = [("macro_auc", "test macro AUC"), ("wall_seconds", "wall seconds per run"),
              ("steps_per_second", "training steps / s")]
    fig = Figure(figsize=(4.6 * len(panels), 3.8))
    axs = fig.subplots(1, len(panels))
    xi = _x_axis(axes)
    if xi is None:  # no grid: one point per metric
        for ax, (column, label) in zip(axs, panels):
            mean, std, _ = mean_std([r[column] for r in rows])
            ax.errorbar([0], [mean], yerr=[0 if math.isnan(std) else std], fmt="o")
            ax.set_title(label)
            ax.set_xticks([])
    else:
        x_axis = axes[xi]
        others = [a for i, a in enumerate(axes) if i != xi]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x_axis.values)
        positions = dict(zip(x_axis.texts, x_axis.values if numeric else range(len(x_axis.texts))))
        for combo in itertools.product(*[a.texts for a in others]):
            fixed = dict(zip([a.key for a in others], combo))
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in fixed.items()) or None
            for ax, (column, _) in zip(axs, panels):
                xs, means, stds = [], [], []
                for text in x_axis.texts:
                    members = [r for r in rows if r[x_axis.key] == text
                               and all(r[k] == v for k, v in fixed.items())]
                    mean, std, n = mean_std([m[column] for m in members])
                    if n:
                        xs.append(positions[text])
                        means.append(mean)
                        stds.append(0.0 if math.isnan(std) else std)
                if xs:
                    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label,
                                linestyle="-" if numeric else "none")
        for ax, (_, label) in zip(axs, panels):
            ax.set_xlabel(x_axis.key)
            ax.set_title(label)
            ax.grid(alpha=0.3)
            if numeric:
                values = [float(v) for v in x_axis.values]
                if min(values) > 0 and max(values) / min(values) >= 4:
                    ax.set_xscale("log", base=2)
                ax.set_xticks(values)
                ax.set_xticklabels(x_axis.texts)
            else:
                ax.set_xticks(range(len(x_axis.texts)))
                ax.set_xticklabels(x_axis.texts, rotation=20)
        if others:
            axs[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)


@dataclass
class SweepResult:
    rows: list
    axes: list
    ran: list
    skipped: list
    failed: dict
    out_dir: Path


def write_outputs(runs, axes, out_dir: Path, title: str, plot: bool = True,
                  baseline: Optional[dict] = None) -> list[dict]:
    """sweep.csv and sweep.md (and with `plot`, sweep.png) from the finished planned runs' folders;
    with `baseline` (a grid point, :func:`parse_baseline`) sweep.md has each row's macro-AUC
    difference to it with its 95% interval (:func:`baseline_differences`)."""
    columns = metric_columns(term_columns(runs))
    rows = collect_rows(runs, axes, columns[len(AUC_COLUMNS):-len(EVALUATION_COLUMNS)])
    write_csv(rows, axes, out_dir / "sweep.csv", columns)
    differences = baseline_differences(rows, axes, out_dir / "runs", baseline) if baseline else None
    write_text(out_dir / "sweep.md", format_markdown(rows, axes, title, columns, recorded_notes(runs), differences,
                                                     baseline))
    if rows and plot:
        plot_sweep(rows, axes, out_dir / "sweep.png", title)
    return rows


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
