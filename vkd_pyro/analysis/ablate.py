"""The paper's ablations (Tables 2 and 3), run as sweeps and laid out as the paper lays them out.

`vkd-pyro ablate --config FILE --table 2|3 --seeds N --out DIR [key=value ...]`:

- Table 2, architecture: inference.objective = vkd (full), no_mi (without L_MI, Eq. 7),
  image_only (without VKD: no EHR, no KL, the image classifier alone);
- Table 3, size of z: model.z_dim = 64, 128, 512, 1024 (`--values` for others).

The runs are a sweep (:mod:`vkd_pyro.analysis.sweep`: the same run folders under DIR/runs/, the same
sweep.csv/sweep.md/sweep.png, the same resumption); the table (rows = configurations, a column for the
dataset of the config with the test macro AUC as mean ± std over seeds, and the paper's own figures in
labelled columns beside it for reference) goes to DIR/table2.md or DIR/table3.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from vkd_pyro.analysis.grid import Axis
from vkd_pyro.analysis.sweep import run_sweep
from vkd_pyro.analysis.sweep_tables import (
    aggregate,
    baseline_differences,
    baseline_note,
    format_difference,
    format_mean_std,
)
from vkd_pyro.config import load_config, split_assignment
from vkd_pyro.errors import UserError
from vkd_pyro.files import write_text

PAPER_DATASETS = ("OpenI", "MIMIC-CXR")

# van Sonsbeek et al., IPMI 2021: Table 2 and Table 3, macro AUC (average over the classes).
TABLES = {
    2: {
        "title": "Table 2: AUC scores for varying architecture compositions",
        "key": "inference.objective",
        "values": ["vkd", "no_mi", "image_only"],
        "labels": {"vkd": "Full architecture", "no_mi": "w/o L_MI (Eq. 7)", "image_only": "w/o VKD (no EHR)"},
        "paper": {"vkd": (0.885, 0.839), "no_mi": (0.873, 0.832), "image_only": (0.837, 0.807)},
        "baseline": "image_only",  # each row's macro-AUC difference to it, with its 95% interval
    },
    3: {
        "title": "Table 3: AUC scores for varying size of latent space z",
        "key": "model.z_dim",
        "values": ["64", "128", "512", "1024"],
        "labels": {"512": "512 - default"},
        "paper": {"64": (0.814, 0.775), "128": (0.870, 0.829), "512": (0.885, 0.839), "1024": (0.891, 0.842)},
    },
}


def table_axis(table: int, values: Optional[Sequence[str]] = None) -> Axis:
    """The grid axis of Table `table` (its paper values unless `values` are given; Table 3 only)."""
    if table not in TABLES:
        raise UserError(f"--table: 2 or 3, got {table}")
    spec = TABLES[table]
    if values:
        if table != 3:
            raise UserError("--values: only for --table 3 (the sizes of z)")
        texts = [str(v).strip() for v in values]
        try:
            parsed = [int(t) for t in texts]
        except ValueError:
            raise UserError(f"--values: sizes of z are integers, got {','.join(texts)}") from None
        if min(parsed) < 1 or len(set(parsed)) != len(parsed):
            raise UserError(f"--values: distinct positive sizes of z, got {','.join(texts)}")
        return Axis(spec["key"], texts, parsed)
    texts = list(spec["values"])
    return Axis(spec["key"], texts, [int(t) if t.isdigit() else t for t in texts])


def format_table(table: int, rows: Sequence[dict], axis: Axis, dataset: str, seeds: int,
                 differences: Optional[dict] = None) -> str:
    """Markdown in the paper's layout: a row per configuration, our column, then the paper's columns.
    Table 2 has a column of each row's macro-AUC difference to image_only (`differences` from
    `vkd_pyro.analysis.sweep_tables.baseline_differences`; "–" where there is none)."""
    spec = TABLES[table]
    base = spec.get("baseline")
    groups = dict((a[axis.key], members) for a, members in aggregate(rows, [axis]))
    ours = f"{dataset} (vkd-pyro, mean ± std)"
    header = (["Size of z" if table == 3 else "", ours, "n"]
              + ([f"Δ vs {base} [95% CI]"] if base else []) + [f"{d} (paper)" for d in PAPER_DATASETS])
    lines = [f"# {spec['title']}", "",
             f"Test macro AUC of vkd-pyro on `{dataset}` over {seeds} seed(s), beside the paper's figures.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for text in axis.texts:
        members = groups.get(text, [])
        paper = spec["paper"].get(text)
        cells = [spec["labels"].get(text, text), format_mean_std([m["macro_auc"] for m in members]),
                 str(len(members))]
        if base:
            cells.append("baseline" if text == base else format_difference((differences or {}).get((text,))))
        cells += [f"{p:.3f}" if paper else "–" for p in (paper or (None,) * len(PAPER_DATASETS))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ([""] + [baseline_note({axis.key: base})] if base else [])
    lines += ["",
              "mean ± std: over seeds (sample std, n-1; the mean alone for one seed); n: finished seeds. "
              f"The `(paper)` columns quote van Sonsbeek et al. (IPMI 2021), {spec['title'].split(':')[0]}, "
              "for reference only: real OpenI / MIMIC-CXR radiographs, DenseNet-121, ClinicalBERT; they are "
              "not results of this code and not comparable with runs on other data or settings.", ""]
    return "\n".join(lines)


def ablate(config_path: str, table: int, seeds: int, out_dir, overrides: Sequence[str] = (),
           values: Optional[Sequence[str]] = None, progress: Optional[bool] = False,
           fit: Optional[Callable] = None, say: Callable[[str], None] = print, launcher=None) -> str:
    """Run (or resume) the ablation of Table `table` (with `launcher`, as :func:`run_sweep`), write
    DIR/table<table>.md and return its text."""
    axis = table_axis(table, values)
    for override in overrides:
        assignment = split_assignment(override)
        if assignment and assignment[0] == axis.key:
            raise UserError(f"{override}: Table {table} varies {axis.key} itself")
    dataset = load_config(config_path, overrides).data.name
    out_dir = Path(out_dir)
    result = run_sweep(config_path, [axis], seeds, out_dir, overrides, progress=progress, fit=fit, say=say,
                       launcher=launcher)
    base = TABLES[table].get("baseline")
    differences = (baseline_differences(result.rows, [axis], out_dir / "runs", {axis.key: base})
                   if base and base in axis.texts else None)
    text = format_table(table, result.rows, axis, dataset, seeds, differences)
    write_text(out_dir / f"table{table}.md", text)
    if result.failed:
        say(f"{len(result.failed)} run(s) failed: " + "; ".join(f"{k}: {v}" for k, v in result.failed.items()))
    return text
