"""The regime map: when does the report help? Tabulates the sweeps of `benchmarks/regimes.sh` (and of
`benchmarks/remedies.sh`): every folder under OUT_DIR with a runs/ folder is one objective.

For every cell (phantom difficulty d, training fraction f) and objective it prints the test macro
AUC, mean ± sample std over seeds, and for the image classifiers the difference to `image_only` on
the same test records with its 95% interval: a paired bootstrap over test records pooled over the
seeds both sides have (`vkd_pyro.analysis.compare.pooled_bootstrap`, 2000 replicates); the
`text_only` column is the teacher's ceiling, q(y|z_T) on the test *reports*. A second table, the
report branch, gives per cell and objective the validation AUC (what a remedy is chosen on), the
test AUC, the `teacher` block of metrics.json (q(y|z_T) on the test reports: macro AUC, NLL), the
test KL(q||p) per record at beta = 1 and the active units of q(z_T|x_T) (from each run's
sweep_run.json). With --png it draws the differences with their intervals, one panel per objective.

    .venv/bin/python benchmarks/regime_map.py OUT_DIR [--png docs/regimes.png]
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


def runs_of(sweep: Path) -> dict:
    """(difficulty, fraction) -> {seed: run folder} for the finished runs of one sweep folder."""
    cells: dict = {}
    for folder in sorted((sweep / "runs").glob("*")):
        if not (folder / "metrics.json").is_file():
            continue
        config = yaml.safe_load((folder / "config.yaml").read_text())
        key = (float(config["data"]["difficulty"]), float(config["data"]["train_fraction"]))
        cells.setdefault(key, {})[int(config["seed"])] = folder
    return cells


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


def difference(a_runs: dict, b_runs: dict, boot: int):
    """B - A pooled over the seeds both have: (difference, (low, high), seeds) or None."""
    seeds = sorted(set(a_runs) & set(b_runs))
    if not seeds:
        return None
    pairs = []
    for s in seeds:
        a, b = read_predictions(a_runs[s]), read_predictions(b_runs[s])
        pairs.append(((a.probs, a.labels, a.mask, a.record_ids), (b.probs, b.labels, b.mask, b.record_ids)))
    result = pooled_bootstrap(pairs, a.classes, n_boot=boot, seed=0)
    return result.difference, result.interval, len(seeds)


def sweep_order(root: Path) -> list:
    """The sweep folders under `root` (those with runs/): the known objectives in LABELS' order, then
    the others (e.g. the remedies of benchmarks/remedies.sh) by name."""
    found = sorted(p.name for p in root.iterdir() if (p / "runs").is_dir())
    return [n for n in LABELS if n in found] + [n for n in found if n not in LABELS]


def summary_of(folder: Path, key: str):
    path = folder / "sweep_run.json"
    return json.loads(path.read_text()).get(key) if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the OUT_DIR of benchmarks/regimes.sh or benchmarks/remedies.sh")
    parser.add_argument("--png", type=Path, default=None, help="draw the differences here")
    parser.add_argument("--boot", type=int, default=2000)
    args = parser.parse_args()
    if not args.root.is_dir():
        sys.exit(f"{args.root}: no such folder")
    sweeps = {name: runs_of(args.root / name) for name in sweep_order(args.root)}
    if "image_only" not in sweeps:
        sys.exit(f"{args.root}: no image_only sweep (a folder image_only/runs)")
    compared = [name for name in sweeps if name not in ("image_only", "text_only")]
    teacher = sweeps.get("text_only", {})
    cells = sorted(sweeps["image_only"])
    head = ["difficulty", "train fraction", "image only"]
    for name in compared:
        head += [label(name), f"{label(name)} - image only [95% CI]"]
    if teacher:
        head.append("teacher (text only)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    drawn: dict = {name: [] for name in compared}
    for cell in cells:
        d, f = cell
        base = sweeps["image_only"][cell]
        row = [f"{d:g}", f"{f:g}", mean_std([metric(p, "macro_auc") for p in base.values()])]
        for name in compared:
            runs = sweeps[name].get(cell, {})
            row.append(mean_std([metric(p, "macro_auc") for p in runs.values()]))
            diff = difference(base, runs, args.boot) if runs else None
            if diff is None:
                row.append("-")
            else:
                value, (low, high), n = diff
                mark = " *" if low > 0 or high < 0 else ""
                row.append(f"{value:+.3f} [{low:+.3f}, {high:+.3f}] (n={n}){mark}")
                drawn[name].append((cell, value, low, high))
        if teacher:
            row.append(mean_std([metric(p, "macro_auc") for p in teacher.get((0.0, f), {}).values()]))
        print("| " + " | ".join(row) + " |")
    print("\n* the 95% interval excludes 0. Differences: paired bootstrap over the test records, "
          f"{args.boot} replicates, pooled over the seeds both objectives have.")
    print("\nThe report branch: validation and test macro AUC of the image classifier, the teacher q(y|z_T) on "
          "the test reports (macro AUC, NLL), the test KL(q||p) per record at beta = 1 and the active units of "
          "q(z_T|x_T) (Var_x E_q[z_d] > 0.01 over the test reports); mean ± std over seeds.\n")
    head = ["difficulty", "train fraction", "objective", "seeds", "validation AUC", "test AUC", "teacher AUC",
            "teacher NLL", "KL", "active units"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for cell in cells:
        for name in ["image_only", *compared]:
            runs = list(sweeps[name].get(cell, {}).values())
            if not runs:
                continue
            print("| " + " | ".join([
                f"{cell[0]:g}", f"{cell[1]:g}", label(name), str(len(runs)),
                mean_std([metric(p, "val_macro_auc") for p in runs]), mean_std([metric(p, "macro_auc") for p in runs]),
                mean_std([metric(p, "teacher", "macro_auc") for p in runs]),
                mean_std([metric(p, "teacher", "nll") for p in runs]),
                mean_std([(summary_of(p, "elbo") or {}).get("kl") for p in runs if metric(p, "teacher")]),
                mean_std([summary_of(p, "active_units") for p in runs], "{:.1f}")]) + " |")
    if args.png:
        draw(drawn, args.png)
        print(f"wrote {args.png}")


def label(name: str) -> str:
    return LABELS.get(name, name)


def draw(drawn: dict, path: Path) -> None:
    names = [n for n in drawn if drawn[n]]
    fig = Figure(figsize=(4.2 * len(names), 3.6))
    axs = fig.subplots(1, len(names), squeeze=False)[0]
    colours = {0.0: matplotlib.colormaps.get_cmap("tab10")(0), 0.5: matplotlib.colormaps.get_cmap("tab10")(3)}
    for ax, name in zip(axs, names):
        for (d, f), value, low, high in drawn[name]:
            x = {0.1: 0, 0.3: 1, 1.0: 2}.get(f, f) + (0.08 if d else -0.08)
            ax.errorbar([x], [value], yerr=[[value - low], [high - value]], fmt="o", capsize=3,
                        color=colours.get(d, "grey"), label=f"difficulty {d:g}")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks([0, 1, 2])
        ax.set_xticklabels(["10%", "30%", "100%"])
        ax.set_xlabel("training records")
        ax.set_ylabel("macro AUC minus image only")
        ax.set_title(label(name), fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.suptitle("When does the report help? (test macro AUC difference, 95% paired-bootstrap interval)",
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)


if __name__ == "__main__":
    main()
