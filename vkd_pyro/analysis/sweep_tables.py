"""A sweep's tables and figure, rebuilt from its run folders: sweep.csv (a row a run), sweep.md (mean and
std over seeds per grid point, with the notes of what the runs were and, with a baseline, each row's
paired difference to it) and sweep.png."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure

from vkd_pyro.analysis.compare import pooled_bootstrap
from vkd_pyro.analysis.diagnostics import ACTIVE_THRESHOLD
from vkd_pyro.analysis.grid import NO_EFFECT_KEYS, Axis, PlannedRun, is_finished
from vkd_pyro.analysis.sweep_run import IS_SAMPLES, RUN_SUMMARY
from vkd_pyro.config import load_config
from vkd_pyro.errors import UserError
from vkd_pyro.files import atomic_path, write_text
from vkd_pyro.objectives import objective_for
from vkd_pyro.training.predictions import read_predictions
from vkd_pyro.training.run_folder import flatten

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
