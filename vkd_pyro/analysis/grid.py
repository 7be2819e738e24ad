"""A sweep's plan: the grid (`--grid key=v1,v2,...`), one run folder per (grid point, seed), the
configs checked against what the folders hold, and the baseline grid point (`--baseline`)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from vkd_pyro.config import load_config, parse_value, split_assignment
from vkd_pyro.errors import UserError
from vkd_pyro.training import distributed
from vkd_pyro.training.run_folder import (
    config_differences,
    flatten,
    folder_lock,
    move_aside,
    read_record,
    run_entries,
    safe_name,
)

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


def run_name(assignment: dict, seed: int) -> str:
    """`key=value,key=value-seed<k>` (values made safe for a file name), `seed<k>` without a grid."""
    parts = ",".join(f"{key}={safe_name(text)}" for key, text in assignment.items())
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
