"""Paired comparison of two runs on the same test records: the macro-AUC difference B - A and its
95% paired-bootstrap interval, per class too, and pooled over runs paired by seed.

numpy and scikit-learn only (no torch), for `vkd-pyro compare RUN_A RUN_B`.

The statistic. For class c, AUC_c(run) is the ROC AUC of the run's probabilities against the labels
over the records whose label c is known (mask 1); c is *defined* on a set of records when it has
both a positive and a negative there. The macro difference is

    Delta = mean_{c defined} AUC_c(B) - mean_{c defined} AUC_c(A) = mean_{c defined} (AUC_c(B) - AUC_c(A)),

both runs being scored on the same records with the same labels, so the same classes are defined
for both. The point estimate is computed on all test records with scikit-learn's `roc_auc_score`.

The interval (paired bootstrap over test records). Replicate r draws N record indices with
replacement (numpy PCG64 seeded by `seed`) and computes both runs' AUCs on that same resample;
classes undefined in the resample are left out of that replicate's macro (and of that class's own
replicates). The interval is the 2.5th and 97.5th percentiles of the replicate differences
(percentile method), B = 2000 replicates by default. Identical predictions give a difference of
exactly 0 in every replicate, hence [0, 0].

Pooled over seeds: given pairs (A_s, B_s) of runs with the same training seed s, the point estimate
is the mean over pairs of Delta_s, and replicate r resamples records jointly within each pair (A_s
and B_s always see the same resample) and averages the per-pair differences. When all pairs are
scored on the same records (the usual case: the split depends on data.split_seed, not on the
training seed) one resample is shared by all pairs, since the test set is one sample of patients
whatever the seed; otherwise each pair draws its own.

Speed: the bootstrap needs 2 x C x B AUCs (56,000 for 14 classes); `roc_auc_score` takes ~2 ms
each on 800 records, so replicate AUCs are computed from resampling *counts* with the weighted
Mann-Whitney form of the same AUC (ties count one half), vectorised over replicates. It equals
`roc_auc_score` on the resampled arrays (tests/test_compare.py checks it against scikit-learn).
"""

from __future__ import annotations

import glob
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from vkd_pyro.errors import UserError
from vkd_pyro.training.predictions import predictions_path, read_predictions

#: Replicates per chunk: bounds the (chunk, N) count matrices on large test sets.
_CHUNK = 250


@dataclass
class Comparison:
    """The result of `paired_bootstrap` / `pooled_bootstrap`.

    difference: macro AUC of B minus that of A (on all records; mean over pairs when pooled);
    interval: (low, high) percentile interval; replicates: replicates with a defined macro;
    per_class: class -> {"a", "b", "difference", "interval", "replicates"} for the defined classes
    ("a"/"b": the runs' AUCs on all records, averaged over pairs when pooled);
    macro_a, macro_b: the runs' macro AUCs (means over pairs when pooled); pairs: runs paired;
    n_records: test records (of the first pair); level, seed, n_boot: as asked.
    """

    difference: float
    interval: tuple[float, float]
    replicates: int
    per_class: dict
    macro_a: float
    macro_b: float
    pairs: int
    n_records: int
    level: float
    seed: int
    n_boot: int


def _check_run(probs, labels, mask, name: str):
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != labels.shape:
        raise UserError(f"{name}: probabilities {probs.shape} and labels {labels.shape} must both be (N, C)")
    mask = np.ones(labels.shape, bool) if mask is None else np.asarray(mask) > 0
    if mask.shape != labels.shape:
        raise UserError(f"{name}: label mask {mask.shape} must have the shape of the labels {labels.shape}")
    if not np.all(np.isfinite(probs)):
        raise UserError(f"{name}: probabilities contain NaN or infinity")
    return probs, labels, mask


def _pair(run_a, run_b, name: str):
    """(probs A, probs B, labels, mask) after checking that the two runs score the same records."""
    pa, la, ma = _check_run(*run_a[:3], name=f"{name} A")
    pb, lb, mb = _check_run(*run_b[:3], name=f"{name} B")
    if pa.shape != pb.shape:
        raise UserError(f"{name}: the runs have predictions of different shapes {pa.shape} and {pb.shape}")
    ids_a = run_a[3] if len(run_a) > 3 else None
    ids_b = run_b[3] if len(run_b) > 3 else None
    if ids_a is not None and ids_b is not None and not np.array_equal(np.asarray(ids_a), np.asarray(ids_b)):
        raise UserError(f"{name}: the runs scored different test records (record ids differ; same data.split "
                        "and data.split_seed needed)")
    if not (np.array_equal(la, lb) and np.array_equal(ma, mb)):
        raise UserError(f"{name}: the runs have different test labels or label masks (not the same records)")
    return pa, pb, la, ma


def _defined(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Boolean (C,): classes with a positive and a negative among the known labels."""
    pos = ((labels > 0.5) & mask).sum(0)
    return (pos > 0) & (pos < mask.sum(0))


def _full_aucs(probs, labels, mask, classes_used) -> np.ndarray:
    """scikit-learn's AUC per class on all records (nan where undefined or not used)."""
    out = np.full(labels.shape[1], np.nan)
    ok = _defined(labels, mask) & classes_used
    for c in np.flatnonzero(ok):
        keep = mask[:, c]
        out[c] = roc_auc_score(labels[keep, c] > 0.5, probs[keep, c])
    return out


def weighted_auc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of `scores` (n,) for the 0/1 `positive` (n,) under each row of `weights` (R, n).

    AUC = sum_{i pos, j neg} w_i w_j ([s_i > s_j] + 1/2 [s_i = s_j]) / (W_pos W_neg): with integer
    weights (bootstrap counts) it equals `roc_auc_score` on the records repeated that many times.
    Rows without a weighted positive or negative give nan.
    """
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    pos = positive[order].astype(np.float64)
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])            # one level per distinct score
    wp = np.add.reduceat(w * pos, starts, axis=1)
    wn = np.add.reduceat(w * (1.0 - pos), starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn                               # negative weight under each level
    num = (wp * (below + 0.5 * wn)).sum(1)
    tp, tn = wp.sum(1), wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((tp > 0) & (tn > 0), num / (tp * tn), np.nan)


def _replicate_diffs(pa, pb, labels, mask, counts, classes_used) -> np.ndarray:
    """(R, C) AUC_B - AUC_A per replicate (rows of `counts`) and class; nan where undefined."""
    out = np.full((counts.shape[0], labels.shape[1]), np.nan)
    for c in np.flatnonzero(classes_used):
        keep = mask[:, c]
        y = labels[keep, c] > 0.5
        w = counts[:, keep]
        out[:, c] = weighted_auc(pb[keep, c], y, w) - weighted_auc(pa[keep, c], y, w)
    return out


def _counts(rng: np.random.Generator, n_rep: int, n: int) -> np.ndarray:
    """(n_rep, n) how often each record is drawn when n indices are drawn with replacement."""
    idx = rng.integers(0, n, size=(n_rep, n))
    flat = (idx + n * np.arange(n_rep)[:, None]).ravel()
    return np.bincount(flat, minlength=n_rep * n).reshape(n_rep, n).astype(np.float64)


def _used(classes: Sequence[str], evaluated: Optional[Sequence[str]], n_classes: int) -> np.ndarray:
    if len(classes) != n_classes:
        raise UserError(f"{len(classes)} class names for {n_classes} prediction columns")
    if evaluated is None:
        return np.ones(n_classes, bool)
    unknown = sorted(set(evaluated) - set(classes))
    if unknown:
        raise UserError(f"evaluated classes not among the runs' classes: {', '.join(unknown)}")
    return np.array([c in set(evaluated) for c in classes])


def pooled_bootstrap(pairs: Sequence[tuple[tuple, tuple]], classes: Sequence[str], n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95, evaluated: Optional[Sequence[str]] = None) -> Comparison:
    """The pooled comparison of runs paired by seed (see the module docstring).

    `pairs` is a list of (run_a, run_b); a run is (probs (N, C), labels (N, C), mask (N, C) or None)
    with an optional fourth item, its record ids (N,). Within a pair the runs must score the same
    records (same labels, mask and ids); `evaluated` limits the classes scored (default all).
    """
    if not pairs:
        raise UserError("compare: no pairs of runs to compare")
    if n_boot < 1:
        raise UserError(f"compare: the number of bootstrap replicates must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise UserError(f"compare: the interval level must be in (0, 1), got {level}")
    data = [_pair(a, b, f"pair {k + 1}") for k, (a, b) in enumerate(pairs)]
    n_classes = data[0][0].shape[1]
    if any(d[0].shape[1] != n_classes for d in data):
        raise UserError("compare: the pairs have different numbers of classes")
    used = _used(classes, evaluated, n_classes)

    full_a = np.stack([_full_aucs(pa, la, ma, used) for pa, _, la, ma in data])
    full_b = np.stack([_full_aucs(pb, la, ma, used) for _, pb, la, ma in data])
    defined = ~np.isnan(full_a)                                     # (pairs, C)
    if not defined.any(axis=1).all():
        raise UserError("compare: some run's test labels define no class (every class all 0 or all 1)")
    macro_a = np.array([full_a[k, defined[k]].mean() for k in range(len(data))])
    macro_b = np.array([full_b[k, defined[k]].mean() for k in range(len(data))])

    shared = all(d[2].shape == data[0][2].shape for d in data) and _same_records(pairs)
    rng = np.random.default_rng(seed)
    macro_reps, class_reps = [], []
    for start in range(0, n_boot, _CHUNK):
        r = min(_CHUNK, n_boot - start)
        common = _counts(rng, r, data[0][2].shape[0]) if shared else None
        per_pair = []
        for pa, pb, la, ma in data:
            counts = common if shared else _counts(rng, r, la.shape[0])
            per_pair.append(_replicate_diffs(pa, pb, la, ma, counts, used))
        diffs = np.stack(per_pair)                                  # (pairs, r, C)
        with np.errstate(invalid="ignore"), _quiet():
            macro_pair = np.nanmean(diffs, axis=2)                  # (pairs, r): mean over defined classes
            macro_reps.append(np.mean(macro_pair, axis=0))          # nan when a pair has none defined
            class_reps.append(np.nanmean(diffs, axis=0))            # (r, C)
    macro_reps = np.concatenate(macro_reps)
    class_reps = np.concatenate(class_reps)

    tail = 100.0 * (1.0 - level) / 2.0

    def interval(values):
        values = values[~np.isnan(values)]
        if not len(values):
            return (float("nan"), float("nan")), 0
        lo, hi = np.percentile(values, [tail, 100.0 - tail])
        return (float(lo), float(hi)), int(len(values))

    macro_interval, macro_n = interval(macro_reps)
    per_class = {}
    with _quiet():
        for c, name in enumerate(classes):
            if not defined[:, c].any():
                continue
            iv, n = interval(class_reps[:, c])
            a, b = float(np.nanmean(full_a[:, c])), float(np.nanmean(full_b[:, c]))
            per_class[name] = {"a": a, "b": b, "difference": float(np.nanmean(full_b[:, c] - full_a[:, c])),
                               "interval": iv, "replicates": n}
    return Comparison(difference=float(np.mean(macro_b - macro_a)), interval=macro_interval, replicates=macro_n,
                      per_class=per_class, macro_a=float(macro_a.mean()), macro_b=float(macro_b.mean()),
                      pairs=len(data), n_records=int(data[0][2].shape[0]), level=level, seed=seed, n_boot=n_boot)


def paired_bootstrap(run_a: tuple, run_b: tuple, classes: Sequence[str], n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95, evaluated: Optional[Sequence[str]] = None) -> Comparison:
    """Macro-AUC difference B - A of two runs on the same records, with its paired-bootstrap
    interval and per-class differences; runs as in `pooled_bootstrap` (one pair)."""
    return pooled_bootstrap([(run_a, run_b)], classes, n_boot=n_boot, seed=seed, level=level, evaluated=evaluated)


def _same_records(pairs) -> bool:
    """Whether every pair scores the same records (equal ids when all runs carry them, else equal labels)."""
    first = pairs[0][0]
    for a, _ in pairs[1:]:
        ids0 = first[3] if len(first) > 3 else None
        ids = a[3] if len(a) > 3 else None
        if ids0 is not None and ids is not None:
            if not np.array_equal(np.asarray(ids0), np.asarray(ids)):
                return False
        elif not np.array_equal(np.asarray(first[1]), np.asarray(a[1])):
            return False
    return True


@contextmanager
def _quiet():
    """Silence numpy's 'mean of empty slice' warnings: all-nan rows are expected and handled."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        yield


def format_comparison(result: Comparison, name_a: str = "A", name_b: str = "B") -> str:
    """A small text table: per class the two AUCs, B - A and its interval, then the macro row."""
    pct = f"{100 * result.level:g}%"
    names = list(result.per_class)
    first = max([len(n) for n in names] + [len("Average (macro)")]) + 2
    wa, wb = max(8, len(name_a) + 2), max(8, len(name_b) + 2)
    head = ("".ljust(first) + name_a.rjust(wa) + name_b.rjust(wb) + "B - A".rjust(9)
            + f"{pct} interval".rjust(20))
    rule = "-" * len(head)
    lines = [head, rule]

    def row(label, a, b, d, iv):
        return (label.ljust(first) + f"{a:.3f}".rjust(wa) + f"{b:.3f}".rjust(wb) + f"{d:+.3f}".rjust(9)
                + f"[{iv[0]:+.3f}, {iv[1]:+.3f}]".rjust(20))

    for name in names:
        c = result.per_class[name]
        lines.append(row(name, c["a"], c["b"], c["difference"], c["interval"]))
    lines.append(rule)
    lines.append(row("Average (macro)", result.macro_a, result.macro_b, result.difference, result.interval))
    pooled = f", pooled over {result.pairs} seed pairs" if result.pairs > 1 else ""
    lines.append(f"B = {name_b}, A = {name_a}; paired bootstrap over {result.n_records} test records, "
                 f"{result.replicates} of {result.n_boot} replicates, seed {result.seed}{pooled}")
    return "\n".join(lines)


def collect_runs(target: str, split: str = "test") -> dict:
    """seed -> run folder for `target`: a run folder (it holds predictions_<split>.npz), a sweep or
    ablation folder (its runs/ subfolders), or a glob pattern of run folders. UserError when it
    names no run with predictions, or when two runs share a seed (then name one grid point, e.g.
    `SWEEP/runs/objective=vkd-seed*`)."""
    path = Path(target)
    if (path / predictions_path(".", split).name).is_file():
        folders = [path]
    elif (path / "runs").is_dir():
        folders = sorted(p for p in (path / "runs").iterdir() if predictions_path(p, split).is_file())
    elif glob.has_magic(target):
        folders = sorted(Path(p) for p in glob.glob(target) if predictions_path(p, split).is_file())
    elif not path.exists():
        raise UserError(f"{target}: no such run or sweep folder")
    else:
        folders = []
    if not folders:
        raise UserError(f"{target}: holds no run with {predictions_path('.', split).name} (a run folder, a sweep "
                        "folder or a pattern of run folders; runs trained before predictions were written need "
                        "`vkd-pyro evaluate --run DIR` once)")
    by_seed: dict = {}
    for folder in folders:
        seed = read_predictions(folder, split).meta.get("seed")
        if seed in by_seed:
            raise UserError(f"{target}: {by_seed[seed].name} and {folder.name} both have seed {seed}; name one "
                            f"configuration, e.g. '{path / 'runs' / (folder.name.rsplit('-seed', 1)[0] + '-seed*')}'")
        by_seed[seed] = folder
    return by_seed


def compare_targets(target_a: str, target_b: str, split: str = "test", n_boot: int = 2000, seed: int = 0,
                    level: float = 0.95) -> tuple[Comparison, list[str]]:
    """The comparison B - A of two runs (or sets of runs paired by seed) on `split`, and notes (the
    pairs used, seeds without a partner)."""
    runs_a, runs_b = collect_runs(target_a, split), collect_runs(target_b, split)
    seeds = sorted(set(runs_a) & set(runs_b), key=str)
    if not seeds:
        raise UserError(f"compare: no seed in common ({target_a}: {sorted(runs_a, key=str)}; "
                        f"{target_b}: {sorted(runs_b, key=str)})")
    pairs, classes, evaluated = [], None, None
    for s in seeds:
        a, b = read_predictions(runs_a[s], split), read_predictions(runs_b[s], split)
        if a.classes != b.classes:
            raise UserError(f"compare: {runs_a[s]} and {runs_b[s]} predict different classes")
        classes = a.classes
        evaluated = a.meta.get("eval_classes") or evaluated
        pairs.append(((a.probs, a.labels, a.mask, a.record_ids), (b.probs, b.labels, b.mask, b.record_ids)))
    notes = ["pairs by seed: " + ", ".join(f"{s} ({runs_a[s].name} / {runs_b[s].name})" for s in seeds)]
    unpaired = sorted((set(runs_a) ^ set(runs_b)), key=str)
    if unpaired:
        notes.append(f"left out, no partner: seed(s) {', '.join(map(str, unpaired))}")
    result = pooled_bootstrap(pairs, classes, n_boot=n_boot, seed=seed, level=level, evaluated=evaluated)
    return result, notes
