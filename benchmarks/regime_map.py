"""The regime map: when does the report help? Tabulates the sweeps of `benchmarks/regimes.sh`,
`benchmarks/regimes2.sh` and `benchmarks/remedies.sh`: every folder under OUT_DIR with a runs/ folder is
one objective; a folder named `<objective>_shuffled` or `<objective>_labels` holds that objective with
`data.report_control` set (a control).

A cell is (phantom difficulty d, label noise r, training fraction f). For every cell and objective it
prints the test macro AUC, mean ± sample std over seeds, and for the image classifiers the difference
to `image_only` on the same test records with its interval (95% unless --level): a paired bootstrap over
test records pooled over the seeds both sides have (`vkd_pyro.analysis.compare.pooled_bootstrap`,
--boot replicates); the teacher columns are `text_only` (q(y|z_T) on the test *reports*: macro AUC and
NLL) of the same label noise and fraction. A second table, the report branch, gives per cell and
objective the validation AUC (what a remedy is chosen on), the test AUC, the `teacher` block of
metrics.json (q(y|z_T) on the test reports: macro AUC, NLL), the test KL(q||p) per record at beta = 1
and the active units of q(z_T|x_T) (from each run's sweep_run.json). When controls are present, a
third table gives each control's difference to image only and to the same objective with the true
reports. With --png it draws the differences with their intervals, one panel per objective.
--seeds A-B keeps the runs of seeds A to B only.

    .venv/bin/python benchmarks/regime_map.py OUT_DIR [--png docs/regimes.png] [--seeds 3-9] [--level 0.95]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib  # noqa: E402
import yaml  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from vkd_pyro.analysis.compare import pooled_bootstrap  # noqa: E402
from vkd_pyro.files import atomic_path  # noqa: E402
from vkd_pyro.training.predictions import read_predictions  # noqa: E402

LABELS = {"image_only": "image only", "vkd": "VKD (Eq. 8)", "vkd_remedy": "VKD + remedy", "kd": "KD (Hinton)",
          "text_only": "teacher (text only)"}


CONTROLS = ("shuffled", "labels")


def runs_of(sweep: Path, seeds: range | None = None) -> dict:
    """(difficulty, label noise, fraction) -> {seed: run folder} for the finished runs of one sweep
    folder (only `seeds` when given)."""
    cells: dict = {}
    for folder in sorted((sweep / "runs").glob("*")):
        if not (folder / "metrics.json").is_file():
            continue
        config = yaml.safe_load((folder / "config.yaml").read_text())
        data, seed = config["data"], int(config["seed"])
        if seeds is not None and seed not in seeds:
            continue
        key = (float(data["difficulty"]), float(data.get("label_noise", 0.0)), float(data["train_fraction"]))
        cells.setdefault(key, {})[seed] = folder
    return cells


def teacher_runs(teacher: dict, cell: tuple) -> dict:
    """The text_only runs of `cell`'s label noise and fraction (the reports do not depend on d)."""
    return next((runs for (d, r, f), runs in teacher.items() if (r, f) == cell[1:]), {})


def mean_std(values: list, fmt: str = "{:.3f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return fmt.format(statistics.mean(values)) + " ± " + fmt.format(statistics.stdev(values))


def metric(folder: Path, *keys):
    value = json.loads((folder / "metrics.json").read_text())
    for key in keys:
        value = None if value is None else value.get(key)
    return value


def difference(a_runs: dict, b_runs: dict, boot: int, level: float = 0.95):
    """B - A pooled over the seeds both have: (difference, (low, high), seeds) or None."""
    seeds = sorted(set(a_runs) & set(b_runs))
    if not seeds:
        return None
    pairs = []
    for s in seeds:
        a, b = read_predictions(a_runs[s]), read_predictions(b_runs[s])
        pairs.append(((a.probs, a.labels, a.mask, a.record_ids), (b.probs, b.labels, b.mask, b.record_ids)))
    result = pooled_bootstrap(pairs, a.classes, n_boot=boot, seed=0, level=level)
    return result.difference, result.interval, len(seeds)


def difference_text(diff) -> str:
    if diff is None:
        return "-"
    value, (low, high), n = diff
    mark = " *" if low > 0 or high < 0 else ""
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}] (n={n}){mark}"


def sweep_order(root: Path) -> list:
    """The sweep folders under `root` (those with runs/): the known objectives in LABELS' order, then
    the others (e.g. the remedies of benchmarks/remedies.sh) by name."""
    found = sorted(p.name for p in root.iterdir() if (p / "runs").is_dir())
    return [n for n in LABELS if n in found] + [n for n in found if n not in LABELS]


def summary_of(folder: Path, key: str):
    path = folder / "sweep_run.json"
    return json.loads(path.read_text()).get(key) if path.is_file() else None


def seed_range(text: str) -> range:
    low, _, high = text.partition("-")
    return range(int(low), int(high or low) + 1)


def cell_columns(cells) -> tuple[list, callable]:
    """The column names of a cell and a function cell -> their texts; label noise only when some cell has it."""
    noisy = any(r for _, r, _ in cells)
    head = ["difficulty", *(["label noise"] if noisy else []), "train fraction"]
    return head, lambda c: [f"{c[0]:g}", *([f"{c[1]:g}"] if noisy else []), f"{c[2]:g}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the OUT_DIR of benchmarks/regimes.sh, regimes2.sh or remedies.sh")
    parser.add_argument("--png", type=Path, default=None, help="draw the differences here")
    parser.add_argument("--boot", type=int, default=2000)
    parser.add_argument("--level", type=float, default=0.95, help="the intervals' level (e.g. 1 - 0.05 / 18 for "
                        "Bonferroni over 18 comparisons)")
    parser.add_argument("--seeds", type=seed_range, default=None, metavar="A-B", help="only the runs of seeds A to B")
    args = parser.parse_args()
    if not args.root.is_dir():
        sys.exit(f"{args.root}: no such folder")
    sweeps = {name: runs_of(args.root / name, args.seeds) for name in sweep_order(args.root)}
    if "image_only" not in sweeps:
        sys.exit(f"{args.root}: no image_only sweep (a folder image_only/runs)")
    controls = [n for n in sweeps if n.rsplit("_", 1)[-1] in CONTROLS and not n.startswith("text_only")]
    compared = [name for name in sweeps if name not in ("image_only", "text_only") and name not in controls
                and not name.startswith("text_only")]
    teacher = sweeps.get("text_only", {})
    cells = sorted(sweeps["image_only"])
    cell_head, cell_text = cell_columns(cells)
    level = f"{100 * args.level:.4g}%"
    head = [*cell_head, "image only"]
    for name in compared:
        head += [label(name), f"{label(name)} - image only [{level} CI]"]
    if teacher:
        head += ["teacher (text only) AUC", "teacher NLL"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    drawn: dict = {name: [] for name in compared}
    for cell in cells:
        base = sweeps["image_only"][cell]
        row = [*cell_text(cell), mean_std([metric(p, "macro_auc") for p in base.values()])]
        for name in compared:
            runs = sweeps[name].get(cell, {})
            row.append(mean_std([metric(p, "macro_auc") for p in runs.values()]))
            diff = difference(base, runs, args.boot, args.level) if runs else None
            row.append(difference_text(diff))
            if diff is not None:
                drawn[name].append((cell, diff[0], *diff[1]))
        if teacher:
            taught = teacher_runs(teacher, cell).values()
            row += [mean_std([metric(p, "macro_auc") for p in taught]),
                    mean_std([metric(p, "teacher", "nll") for p in taught])]
        print("| " + " | ".join(row) + " |")
    print(f"\n* the {level} interval excludes 0. Differences: paired bootstrap over the test records, "
          f"{args.boot} replicates, pooled over the seeds both objectives have.")
    print("\nThe report branch: validation and test macro AUC of the image classifier, the teacher q(y|z_T) on "
          "the test reports (macro AUC, NLL), the test KL(q||p) per record at beta = 1 and the active units of "
          "q(z_T|x_T) (Var_x E_q[z_d] > 0.01 over the test reports); mean ± std over seeds.\n")
    head = [*cell_head, "objective", "seeds", "validation AUC", "test AUC", "teacher AUC",
            "teacher NLL", "KL", "active units"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for cell in cells:
        for name in ["image_only", *compared, *controls]:
            runs = list(sweeps[name].get(cell, {}).values())
            if not runs:
                continue
            print("| " + " | ".join([
                *cell_text(cell), label(name), str(len(runs)),
                mean_std([metric(p, "val_macro_auc") for p in runs]), mean_std([metric(p, "macro_auc") for p in runs]),
                mean_std([metric(p, "teacher", "macro_auc") for p in runs]),
                mean_std([metric(p, "teacher", "nll") for p in runs]),
                mean_std([(summary_of(p, "elbo") or {}).get("kl") for p in runs if metric(p, "teacher")]),
                mean_std([summary_of(p, "active_units") for p in runs], "{:.1f}")]) + " |")
    if controls:
        print_controls(sweeps, controls, cells, cell_head, cell_text, args)
    if args.png:
        draw(drawn, args.png)
        print(f"wrote {args.png}")


def print_controls(sweeps: dict, controls: list, cells: list, cell_head: list, cell_text, args) -> None:
    """The controls' table: each control's test AUC, its difference to image only and to the same
    objective with the true reports, and its teacher (text_only with the same control)."""
    level = f"{100 * args.level:.4g}%"
    print(f"\nThe controls (data.report_control): test macro AUC, the difference to image only and to the same "
          f"objective with the true reports [{level} paired-bootstrap interval], and the teacher trained and "
          "evaluated with that control's training reports (text_only; test reports are the true ones).\n")
    head = [*cell_head, "objective", "reports", "test AUC", "- image only", "- true reports", "teacher AUC",
            "teacher NLL"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for cell in cells:
        for name in controls:
            runs = sweeps[name].get(cell, {})
            if not runs:
                continue
            objective, control = name.rsplit("_", 1)
            true = sweeps.get(objective, {}).get(cell, {})
            taught = teacher_runs(sweeps.get(f"text_only_{control}", {}), cell).values()
            print("| " + " | ".join([
                *cell_text(cell), label(objective), control, mean_std([metric(p, "macro_auc") for p in runs.values()]),
                difference_text(difference(sweeps["image_only"].get(cell, {}), runs, args.boot, args.level)),
                difference_text(difference(true, runs, args.boot, args.level) if true else None),
                mean_std([metric(p, "macro_auc") for p in taught]),
                mean_std([metric(p, "teacher", "nll") for p in taught])]) + " |")


def label(name: str) -> str:
    """The objective's name in tables and figures; a control's: "KD (Hinton), shuffled reports"."""
    objective, _, control = name.rpartition("_")
    if control in CONTROLS and objective:
        return f"{label(objective)}, {control} reports"
    return LABELS.get(name, name)


def draw(drawn: dict, path: Path) -> None:
    """One panel per objective: the difference to image only with its interval, against the training
    fraction coloured by difficulty (the first map) or against the label noise coloured by fraction."""
    names = [n for n in drawn if drawn[n]]
    noisy = any(cell[1] for n in names for cell, *_ in drawn[n])
    fig = Figure(figsize=(4.2 * len(names), 3.6))
    axs = fig.subplots(1, len(names), squeeze=False)[0]
    palette = matplotlib.colormaps.get_cmap("tab10")
    for ax, name in zip(axs, names):
        for (d, r, f), value, low, high in drawn[name]:
            if noisy:
                x, key, colour = r + (0.01 if f == 1.0 else -0.01), f"{f:g} of the records", palette(0 if f < 1 else 3)
            else:
                x = {0.1: 0, 0.3: 1, 1.0: 2}.get(f, f) + (0.08 if d else -0.08)
                key, colour = f"difficulty {d:g}", palette(0 if d == 0 else 3)
            ax.errorbar([x], [value], yerr=[[value - low], [high - value]], fmt="o", capsize=3, color=colour, label=key)
        ax.axhline(0.0, color="black", linewidth=0.8)
        if noisy:
            ax.set_xticks(sorted({cell[1] for cell, *_ in drawn[name]}))
            ax.set_xlabel("label noise r (training labels)")
        else:
            ax.set_xticks([0, 1, 2])
            ax.set_xticklabels(["10%", "30%", "100%"])
            ax.set_xlabel("training records")
        ax.set_ylabel("macro AUC minus image only")
        ax.set_title(label(name), fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.suptitle("When does the report help? (test macro AUC difference, paired-bootstrap interval)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)


if __name__ == "__main__":
    main()
