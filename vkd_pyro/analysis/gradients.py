"""Gradient estimators compared as researchers measure them (`vkd-pyro gradients`): the variance,
signal-to-noise ratio and cost of the training loss's gradient, per parameter group, across Monte
Carlo sample counts (L guide particles, M prior samples) and estimators (`inference.elbo`).

What is measured. Every grid setting (the config with `--grid` keys changed) gets the same weights:
a trained run's (`--run`, checkpoint.pt or last.pt) or a config's initialisation (`--config`, as
the trainer builds it: `pyro.set_rng_seed(seed)`, then `build_module`); `--at init,trained` both.
For each setting, R estimates g_1..g_R of the gradient of the training loss are drawn: g_r is the
gradient of 1/K sum_k loss(batch_k, beta), `VKDModule.forward` (minus the objective per example)
over the same K training batches (the first K of epoch 1's order) at a fixed KL weight beta, with
repeat r seeded by seed + r. The module is in **eval mode**: dropout off and batch norm on its
running statistics, so that the estimates differ by their Monte Carlo draws alone.

Per parameter group (`GROUPS`, by module path; a group the module lacks is left out), with g_r in
R^P the group's gradient in repeat r (a parameter without a gradient counts as 0) and sample
moments over the R repeats (ddof = 1):

- SNR_p = |mean_r g_rp| / sd_r g_rp per scalar parameter p (Rainforth et al. 2018, "Tighter
  variational bounds are not necessarily better"): its median, 10th and 90th percentiles over the
  group (parameters with mean 0 and sd 0 left out);
- directional SNR (Rainforth et al. 2018, Appendix): with u = E[g] / ||E[g]||, each estimate splits
  into g_par = (g . u) u and g_perp = g - g_par, and DSNR = mean_r ||g_par|| / mean_r ||g_perp||;
- variance = sum_p Var_r[g_rp], the trace of the estimator's covariance (Mohamed et al. 2020,
  "Monte Carlo gradient estimation in machine learning"), and its mean and max over parameters;
- cosine_r = g_r . g* / (||g_r|| ||g*||) to a reference gradient g*, the mean of `reference_repeats`
  estimates at the grid's largest L and M and at least `reference_samples` of each (same weights,
  batches and other keys): its mean and sd over repeats;
- efficiency = 1 / (variance x seconds per estimate), the cost-matched efficiency of Mohamed et al.
  2020: an estimator that costs c times as much must cut the variance c-fold to break even.

Per setting: each recorded term (`module.terms`, per example, averaged over the K batches) as its
mean and sd over repeats; `ms_per_gradient`, the median wall time of one estimate (forward and
backward over the K batches; the first repeat is a warm-up and not timed); `peak_mb`, on CUDA
`torch.cuda.max_memory_allocated` over the setting's estimates, on the CPU the bytes of the distinct
storages autograd saves for backward in one batch's forward (weights included; the most over the K
batches of the first repeat, `torch.autograd.graph.saved_tensors_hooks`).

Outputs (atomic writes): gradients.csv (one row per weights, setting and group), gradients.md (a
table per weights, with what was measured) and gradients.png (SNR median and total variance against
L and M on log-log axes, with the sqrt(n) and 1/n slopes of an average of n independent draws).
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from vkd_pyro.analysis.grid import NO_EFFECT_KEYS, Axis, parse_grid
from vkd_pyro.config import Config, config_from_dict, load_config, read_config_file
from vkd_pyro.data.batching import Batch, collate
from vkd_pyro.data.prepare import prepare_data
from vkd_pyro.errors import UserError
from vkd_pyro.files import atomic_path, write_text
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.training.build import build_module, check_config, initial_module
from vkd_pyro.training.checkpoint import load_resume_state
from vkd_pyro.training.config_match import check_trained_with
from vkd_pyro.training.device import resolve_device
from vkd_pyro.training.distillation import soft_targets
from vkd_pyro.training.distributed import say
from vkd_pyro.training.evaluate import seeded
from vkd_pyro.training.load import load_trained, read_run_config
from vkd_pyro.training.loop import global_batches
from vkd_pyro.training.run_folder import check_loadable, flatten

# module path -> label: the parameter groups, in the order of the tables
GROUPS = {
    "model.prior_net": "prior p(z_I|x_I)",
    "guide.posterior_net": "posterior q(z_T|x_T)",
    "guide.text_head": "text block",
    "model.classifier": "classifier p(y|x_I,z_I)",
    "model.text_classifier": "MI head q(y|z_T)",
    "model.image_encoder": "image encoder",
}
SAMPLE_COUNT_KEYS = ("inference.num_particles", "inference.prior_samples")  # L and M
# keys that decide the K batches, which every setting shares (set them with key=value instead)
BATCH_KEYS = ("data.", "seed", "train.batch_size", "text_encoder.name", "text_encoder.max_tokens", "cache_dir")
WEIGHTS = ("init", "trained")
STATISTICS = ("snr_median", "snr_p10", "snr_p90", "dsnr", "variance", "variance_mean", "variance_max",
              "cosine_mean", "cosine_sd")
CPU_MEMORY = "bytes saved for backward by one batch's forward (saved_tensors_hooks)"
CUDA_MEMORY = "torch.cuda.max_memory_allocated"


@dataclass
class Weights:
    """Weights every setting's module takes: `init` or `trained`, the state dict, the config they
    were built for, and where they come from (for the notes)."""
    name: str
    state: dict
    config: Config
    source: str


@dataclass
class Setting:
    """A grid point: its values as written, its config and its module (on the CPU between uses)."""
    assignment: dict
    config: Config
    module: VKDModule = field(repr=False)

    @property
    def samples(self) -> dict:
        """L and M of this setting, {key: int}."""
        flat = flatten(self.config.to_dict())
        return {key: int(flat[key]) for key in SAMPLE_COUNT_KEYS}

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.assignment.items()) or "the config as given"


@dataclass
class Draws:
    """R gradient estimates of one setting: group -> (R, P) float32, term -> R values, the seconds of
    the timed estimates and the peak memory in bytes."""
    grads: dict
    terms: dict
    seconds: list
    peak_bytes: int


@dataclass
class Measured:
    """One setting's results under one set of weights."""
    weights: str
    setting: Setting
    groups: dict  # group -> statistics (gradient_statistics) with efficiency
    terms: dict  # <term>_mean, <term>_sd
    ms_per_gradient: float
    peak_mb: float


# --------------------------------------------------------------------------- statistics (pure)


def snr_quantiles(mean: torch.Tensor, sd: torch.Tensor) -> dict:
    """Median, 10th and 90th percentile of SNR_p = |mean_p| / sd_p over the parameters whose mean
    and sd are not both 0 (sd = 0 alone gives an infinite SNR); NaN when none is left."""
    keep = (mean != 0) | (sd != 0)
    snr = (mean.abs() / sd)[keep].numpy()
    if snr.size == 0:
        return dict.fromkeys(("snr_median", "snr_p10", "snr_p90"), math.nan)
    with np.errstate(invalid="ignore"):  # interpolating between two infinite SNRs gives NaN: it is inf
        median, p10, p90 = np.nan_to_num(np.quantile(snr, [0.5, 0.1, 0.9]), nan=math.inf, posinf=math.inf)
    return {"snr_median": float(median), "snr_p10": float(p10), "snr_p90": float(p90)}


def directional_snr(g: torch.Tensor, mean: torch.Tensor) -> float:
    """DSNR = mean_r ||g_par,r|| / mean_r ||g_perp,r|| with u = mean / ||mean||, g_par = (g . u) u and
    g_perp = g - g_par (Rainforth et al. 2018, Appendix); NaN when the mean gradient is 0."""
    norm = mean.norm()
    if norm == 0:
        return math.nan
    u = mean / norm
    along = g @ u
    across = (g - along[:, None] * u).norm(dim=1)
    return float(along.abs().mean() / across.mean())


def cosine_statistics(g: torch.Tensor, reference: Optional[torch.Tensor]) -> dict:
    """Mean and sd (ddof = 1) over repeats of cos(g_r, g*) = g_r . g* / (||g_r|| ||g*||); NaN without
    a reference or with a zero one."""
    if reference is None or reference.norm() == 0:
        return {"cosine_mean": math.nan, "cosine_sd": math.nan}
    reference = reference.to(g.dtype)
    cosine = (g @ reference) / (g.norm(dim=1) * reference.norm())
    return {"cosine_mean": float(cosine.mean()), "cosine_sd": float(cosine.std(correction=1))}


def group_statistics(g: torch.Tensor, reference: Optional[torch.Tensor] = None) -> dict:
    """The statistics of one group's R estimates `g` (R, P) (module docstring), in float64:
    parameters P, the SNR quantiles, DSNR, variance = sum_p Var_r[g_rp] (ddof = 1) with its mean and
    max over p, and the cosine to `reference` (P,)."""
    g = g.double()
    mean, variance = g.mean(0), g.var(0, correction=1)
    return {"parameters": g.shape[1], **snr_quantiles(mean, variance.sqrt()), "dsnr": directional_snr(g, mean),
            "variance": float(variance.sum()), "variance_mean": float(variance.mean()),
            "variance_max": float(variance.max()), **cosine_statistics(g, reference)}


def gradient_statistics(draws: Mapping[str, torch.Tensor],
                        reference: Optional[Mapping[str, torch.Tensor]] = None) -> dict:
    """group -> :func:`group_statistics` of its (R, P) estimates, against the group's reference
    gradient (P,) when `reference` is given."""
    if any(g.shape[0] < 2 for g in draws.values()):
        raise ValueError("gradient statistics need at least 2 estimates (R >= 2)")
    return {group: group_statistics(g, None if reference is None else reference[group]) for group, g in draws.items()}


def term_statistics(terms: Mapping[str, Sequence[float]]) -> dict:
    """`<term>_mean` and `<term>_sd` (ddof = 1) of each term's values over repeats."""
    out = {}
    for name, values in terms.items():
        out[f"{name}_mean"] = float(np.mean(values))
        out[f"{name}_sd"] = float(np.std(values, ddof=1))
    return out


def efficiency(variance: float, seconds: float) -> float:
    """1 / (variance x seconds per estimate); inf for an estimator without variance."""
    cost = variance * seconds
    return math.inf if cost == 0 else 1.0 / cost


# --------------------------------------------------------------------------- drawing estimates


def group_parameters(module: torch.nn.Module) -> dict:
    """group -> its trainable parameters (module order), for the `GROUPS` the module has."""
    params = {group: [] for group in GROUPS}
    for name, param in module.named_parameters():
        group = next((g for g in GROUPS if name.startswith(g + ".")), None)
        if group is not None and param.requires_grad:
            params[group].append(param)
    return {group: found for group, found in params.items() if found}


def flat_gradient(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """The parameters' gradients as one float32 CPU vector, zeros where a parameter has none."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                     ).detach().to("cpu", torch.float32)


@contextmanager
def saved_bytes() -> Iterator[dict]:
    """storage address -> bytes of each distinct storage autograd saves for backward in the block."""
    storages: dict = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield storages


def backward_pass(module: VKDModule, batches: Sequence[Batch], beta: float, measure: bool = False) -> tuple[dict, int]:
    """Gradients of 1/K sum_k loss(batch_k, beta) into the parameters' .grad (set afresh), the terms
    averaged over the K batches and (`measure`) the most bytes one batch's forward saved for backward."""
    module.zero_grad(set_to_none=True)
    terms: dict = {}
    most = 0
    for batch in batches:
        with saved_bytes() if measure else nullcontext({}) as storages:
            loss, step = module(batch, beta, sync_terms=True)
        most = max(most, sum(storages.values()))
        (loss / len(batches)).backward()
        for name, value in step.values.items():
            terms[name] = terms.get(name, 0.0) + value / len(batches)
    return terms, most


def draw_estimates(module: VKDModule, batches: Sequence[Batch], beta: float, seeds: Sequence[int],
                   device: torch.device) -> Draws:
    """One estimate per seed (:func:`backward_pass` under `seeded(seed)`), timed after the first, with
    the peak memory (module docstring: CUDA's allocator peak, on the CPU the first repeat's saved bytes)."""
    params = group_parameters(module)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    grads = {group: [] for group in params}
    terms: dict = {}
    seconds, peak = [], 0
    for repeat, seed in enumerate(seeds):
        with seeded(seed, device):
            started = time.perf_counter()
            values, saved = backward_pass(module, batches, beta, measure=repeat == 0 and not cuda)
            if cuda:
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - started
        if repeat > 0:
            seconds.append(elapsed)
        peak = max(peak, saved)
        for group, found in params.items():
            grads[group].append(flat_gradient(found))
        for name, value in values.items():
            terms.setdefault(name, []).append(value)
    module.zero_grad(set_to_none=True)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    return Draws({group: torch.stack(rows) for group, rows in grads.items()}, terms, seconds, peak)


# --------------------------------------------------------------------------- configs, weights, batches


def check_counts(repeats: int, batches: int, reference_repeats: int, reference_samples: int) -> None:
    for option, value, least in [("--repeats", repeats, 2), ("--batches", batches, 1),
                                 ("--reference-repeats", reference_repeats, 1),
                                 ("--reference-samples", reference_samples, 1)]:
        if value < least:
            raise UserError(f"{option}: must be >= {least}, got {value}")


def parse_at(text: Optional[str], has_run: bool) -> list[str]:
    """`--at init,trained` -> the weights to measure; default trained with --run, else init."""
    names = [t.strip() for t in text.split(",")] if text else ["trained" if has_run else "init"]
    for name in names:
        if name not in WEIGHTS:
            raise UserError(f"--at {text}: {name!r} is not one of {', '.join(WEIGHTS)} (comma-separated)")
    if "trained" in names and not has_run:
        raise UserError("--at trained: needs --run DIR, the run folder whose weights to measure")
    return list(dict.fromkeys(names))


def check_grid(axes: Sequence[Axis]) -> None:
    """Refuse grid keys that would change the K batches every setting shares."""
    for axis in axes:
        if any(axis.key == key or (key.endswith(".") and axis.key.startswith(key)) for key in BATCH_KEYS):
            raise UserError(f"--grid {axis.key}: the settings share the same K batches; set it once with "
                            f"{axis.key}=VALUE instead")


def base_source(config_path: Optional[str], run: Optional[str], trust_code: bool) -> tuple[dict, str]:
    """(config tree, its name) the settings start from: --config FILE, else the run's config.yaml."""
    if config_path is not None:
        return read_config_file(config_path), str(config_path)
    return read_run_config(Path(run), trust_code).to_dict(), str(Path(run) / "config.yaml")


def grid_settings(tree: dict, source: str, overrides: Sequence[str], axes: Sequence[Axis]) -> list[tuple[dict, Config]]:
    """(assignment, config) of every grid point; a bad key or value is a one-line ConfigError."""
    out = []
    for combo in itertools.product(*[axis.texts for axis in axes]):
        assignment = {axis.key: text for axis, text in zip(axes, combo)}
        extra = [f"{key}={text}" for key, text in assignment.items()]
        out.append((assignment, config_from_dict(tree, source, [*overrides, *extra])))
    return out


def reference_key(settings: Sequence[Setting], setting: Setting, reference_samples: int) -> tuple:
    """The reference of `setting` as ((key, value text), ...): its non-sample-count grid values, and L
    and M each the most of the grid's values and `reference_samples`."""
    assignment = {k: v for k, v in setting.assignment.items() if k not in SAMPLE_COUNT_KEYS}
    for key in SAMPLE_COUNT_KEYS:
        assignment[key] = str(max([s.samples[key] for s in settings] + [reference_samples]))
    return tuple(assignment.items())


def fixed_batches(data, config: Config, count: int, device: torch.device) -> list[Batch]:
    """The first `count` training batches of epoch 1's order (train.batch_size), collated, on `device`."""
    split = data.splits["train"]
    order = global_batches(split, config, epoch=1)
    if count > len(order):
        raise UserError(f"--batches: {count} asked for, but the training split has {len(order)} batches "
                        f"of train.batch_size = {config.train.batch_size}")
    return [collate([split[i] for i in positions]).to(device) for positions in order[:count]]


def setting_module(config: Config, dims: Optional[dict], targets: Optional[torch.Tensor]) -> VKDModule:
    """The module of `config` on the CPU, with kd's soft targets when its objective distils (the
    config's checks first: one line naming the key)."""
    module = build_module(config, dims)
    if check_config(config).distils:
        module.set_soft_targets(targets)
    return module


def initial_weights(config: Config, dims: Optional[dict]) -> Weights:
    """The config's initialisation, as a run starts (`vkd_pyro.training.build.initial_module`)."""
    module, message = initial_module(config, dims)
    if message:
        say(message)
    return Weights("init", module.state_dict(), config, f"the initialisation of {config.inference.objective} "
                   f"at seed {config.seed}")


def trained_weights(run: str, checkpoint: str, trust_code: bool) -> Weights:
    """The run's checkpoint.pt (`best`, through load_trained) or last.pt's `module` (`last`), each
    refused when config.yaml was edited since (vkd_pyro.training.config_match)."""
    folder = Path(run)
    if checkpoint == "best":
        config, module, _ = load_trained(folder, "cpu", trust_code)
        return Weights("trained", module.state_dict(), config, str(folder / "checkpoint.pt"))
    config = read_run_config(folder, trust_code)
    state = load_resume_state(folder)
    check_loadable(folder, state)
    check_trained_with(state["config"], config, folder / "last.pt", folder / "config.yaml")
    return Weights("trained", state["module"], config, str(folder / "last.pt"))


def load_weights(setting: Setting, weights: Weights) -> None:
    """The weights into the setting's module; a mismatch is a one-line UserError naming the keys in
    which the setting's config differs from the one the weights were built for."""
    try:
        setting.module.load_state_dict(weights.state)
    except (KeyError, RuntimeError) as exc:
        ours = flatten(setting.config.to_dict())
        theirs = flatten(weights.config.to_dict())
        keys = [k for k in sorted(set(ours) | set(theirs))
                if k not in NO_EFFECT_KEYS and k != "device" and ours.get(k) != theirs.get(k)]
        raise UserError(f"{', '.join(keys) or setting.describe()}: the {weights.name} weights ({weights.source}) "
                        f"do not fit the module of {setting.describe()} ({str(exc).splitlines()[0]})") from None


# --------------------------------------------------------------------------- the measurement


@dataclass
class Options:
    """What `vkd-pyro gradients` measures (its options; `run` and/or `config`)."""
    out: Path
    config: Optional[str] = None
    run: Optional[str] = None
    overrides: Sequence[str] = ()
    grid: Sequence[str] = ()
    at: Optional[str] = None
    checkpoint: str = "best"
    repeats: int = 32
    batches: int = 4
    beta: float = 1.0
    seed: int = 0
    reference_repeats: int = 16
    reference_samples: int = 64
    device: str = "auto"
    trust_code: bool = False


@dataclass
class Report:
    """The measurement: its results, the grid, and what the notes of gradients.md say."""
    results: list
    axes: list
    options: Options
    batch_size: int
    memory: str
    weights: dict  # name -> source
    references: list  # each reference setting, as text


def check_options(options: Options) -> tuple[list[str], list[Axis]]:
    """(the weights to measure, the grid axes); a one-line UserError for a bad option or grid key."""
    check_counts(options.repeats, options.batches, options.reference_repeats, options.reference_samples)
    if options.config is None and options.run is None:
        raise UserError("gradients: give --run DIR (a trained run) and/or --config FILE")
    names = parse_at(options.at, options.run is not None)
    axes = parse_grid(options.grid)
    check_grid(axes)
    return names, axes


def measure(options: Options) -> Report:
    """Every (weights, setting) of the options, measured (module docstring); refuses (one line) a bad
    option, key or value before any data is read, and weights that do not fit a setting before any
    estimate is drawn."""
    names, axes = check_options(options)
    tree, source = base_source(options.config, options.run, options.trust_code)
    base = (load_config(options.config, options.overrides) if options.config is not None
            else config_from_dict(tree, source, options.overrides))
    points = grid_settings(tree, source, options.overrides, axes)
    objectives = [check_config(config) for _, config in points]
    device = resolve_device(options.device)
    data = prepare_data(base, with_reports=any(o.reads_reports for o in objectives), device=device)
    batches = fixed_batches(data, base, options.batches, device)
    targets = soft_targets(base, data, "cpu", options.trust_code) if any(o.distils for o in objectives) else None
    settings = [Setting(a, c, setting_module(c, data.dims, targets)) for a, c in points]
    references = {}
    for setting in settings:
        key = reference_key(settings, setting, options.reference_samples)
        if key not in references:
            config = config_from_dict(tree, source, [*options.overrides, *(f"{k}={v}" for k, v in key)])
            references[key] = Setting(dict(key), config, setting_module(config, data.dims, targets))
    weights = [initial_weights(base, data.dims) if name == "init" else
               trained_weights(options.run, options.checkpoint, options.trust_code) for name in names]
    for w in weights:  # every load checked before any estimate
        for setting in [*settings, *references.values()]:
            load_weights(setting, w)
    results = [result for w in weights for result in measure_weights(w, settings, references, batches, options, device)]
    return Report(results, axes, options, base.train.batch_size, CUDA_MEMORY if device.type == "cuda" else CPU_MEMORY,
                  {w.name: w.source for w in weights}, [ref.describe() for ref in references.values()])


def measure_weights(weights: Weights, settings: Sequence[Setting], references: dict, batches: Sequence[Batch],
                    options: Options, device: torch.device) -> list[Measured]:
    """Every setting at `weights`, each against its reference gradient (`references`: reference_key ->
    its setting), drawn first at the same weights."""
    for setting in [*settings, *references.values()]:
        load_weights(setting, weights)
    gradients = {key: reference_gradient(ref, batches, options, device) for key, ref in references.items()}
    return [measure_setting(weights.name, setting, batches, options, device,
                            gradients[reference_key(settings, setting, options.reference_samples)])
            for setting in settings]


def reference_gradient(reference: Setting, batches: Sequence[Batch], options: Options, device: torch.device) -> dict:
    """group -> the mean of `reference_repeats` estimates at the reference setting (seeds after the repeats')."""
    seeds = range(options.seed + options.repeats, options.seed + options.repeats + options.reference_repeats)
    module = reference.module.to(device).eval()
    draws = draw_estimates(module, batches, options.beta, list(seeds), device)
    module.to("cpu")
    return {group: g.double().mean(0) for group, g in draws.grads.items()}


def measure_setting(weights: str, setting: Setting, batches: Sequence[Batch], options: Options,
                    device: torch.device, reference: dict) -> Measured:
    """R estimates of one setting (seeds seed .. seed + R - 1) and their statistics."""
    started = time.perf_counter()
    module = setting.module.to(device).eval()
    seeds = list(range(options.seed, options.seed + options.repeats))
    draws = draw_estimates(module, batches, options.beta, seeds, device)
    module.to("cpu")
    seconds = float(np.median(draws.seconds))
    groups = gradient_statistics(draws.grads, reference)
    for stats in groups.values():
        stats["efficiency"] = efficiency(stats["variance"], seconds)
    say(f"gradients: {weights} weights, {setting.describe()}: {options.repeats} estimates in "
        f"{time.perf_counter() - started:.1f} s")
    return Measured(weights, setting, groups, term_statistics(draws.terms), 1000 * seconds, draws.peak_bytes / 2**20)


# --------------------------------------------------------------------------- tables


def term_names(results: Sequence[Measured]) -> list[str]:
    """The recorded terms of all settings, in the order their objectives give them."""
    names: dict = {}
    for result in results:
        for term in result.setting.module.terms:
            names.setdefault(term.name, None)
    return list(names)


def csv_columns(axes: Sequence[Axis], terms: Sequence[str]) -> list[str]:
    return (["weights", *(a.key for a in axes), "group", "parameters", *STATISTICS,
             *(f"{t}_{s}" for t in terms for s in ("mean", "sd")), "ms_per_gradient", "peak_mb", "efficiency",
             "peak_mb_measure"])


def rows(report: Report) -> list[dict]:
    """One row per (weights, setting, group), as gradients.csv holds them."""
    out = []
    for result in report.results:
        for group, stats in result.groups.items():
            row = {"weights": result.weights, **result.setting.assignment, "group": group, **stats, **result.terms,
                   "ms_per_gradient": result.ms_per_gradient, "peak_mb": result.peak_mb,
                   "peak_mb_measure": report.memory}
            out.append(row)
    return out


def write_csv(report: Report, path: Path) -> None:
    columns = csv_columns(report.axes, term_names(report.results))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", restval="nan")
    writer.writeheader()
    for row in rows(report):
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    write_text(path, buffer.getvalue())


def _number(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def _spread(mean: float, sd: float) -> str:
    return f"{_number(mean)} ± {_number(sd)}"


def notes(report: Report) -> list[str]:
    """What gradients.md says was measured."""
    o = report.options
    weights = "; ".join(f"{name}: {source}" for name, source in report.weights.items())
    return [f"R = {o.repeats} gradient estimates per setting (seeds {o.seed} to {o.seed + o.repeats - 1}), each the "
            f"gradient of the training loss (minus the objective per example) averaged over the same K = {o.batches} "
            f"training batches of {report.batch_size} (the first of epoch 1's order), at a fixed KL weight "
            f"beta = {o.beta:g}.",
            "The module is in eval mode: dropout off, batch norm on its running statistics; the estimates differ by "
            "their Monte Carlo draws alone.",
            f"Weights: {weights}.",
            f"Reference gradient g*: the mean of {o.reference_repeats} estimates at "
            + "; ".join(report.references) + ".",
            "SNR: |mean| / sd per scalar parameter over the R estimates (median [10th, 90th percentile]); DSNR: "
            "mean ||g_par|| / mean ||g_perp|| along the mean gradient (Rainforth et al. 2018); variance: the sum "
            "over the group's parameters of the variance over estimates; cosine: to g*, mean ± sd over estimates; "
            "efficiency: 1 / (variance x seconds per estimate) (Mohamed et al. 2020).",
            f"ms: median wall time of one estimate (all K batches; the first estimate untimed). peak MB: "
            f"{report.memory}."]


def format_markdown(report: Report) -> str:
    """gradients.md: the notes, then per weights a table of the groups' statistics and one of the
    settings' terms and cost."""
    keys = [a.key for a in report.axes]
    terms = term_names(report.results)
    lines = ["# Gradient estimates: variance, SNR and cost per parameter group", ""]
    lines += [f"{n}  " for n in notes(report)] + [""]
    for weights in report.weights:
        results = [r for r in report.results if r.weights == weights]
        header = [*keys, "group", "parameters", "SNR median [p10, p90]", "DSNR", "variance", "cosine to g*",
                  "efficiency"]
        lines += [f"## {weights} weights", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for result in results:
            for group, s in result.groups.items():
                label = GROUPS[group].replace("|", "\\|")  # a markdown table cell
                cells = [*result.setting.assignment.values(), label, str(s["parameters"]),
                         f"{_number(s['snr_median'])} [{_number(s['snr_p10'])}, {_number(s['snr_p90'])}]",
                         _number(s["dsnr"]), _number(s["variance"]), _spread(s["cosine_mean"], s["cosine_sd"]),
                         _number(s["efficiency"])]
                lines.append("| " + " | ".join(cells) + " |")
        header = [*keys, *terms, "ms / gradient", "peak MB"]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for result in results:
            cells = [*result.setting.assignment.values(),
                     *(_spread(result.terms.get(f"{t}_mean", math.nan), result.terms.get(f"{t}_sd", math.nan))
                       for t in terms), f"{result.ms_per_gradient:.1f}", f"{result.peak_mb:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- figure


def plot_gradients(report: Report, path: Path) -> None:
    """For each weights and each sample-count key of the grid (L when there is none): SNR median and
    total variance against it on log-log axes, a line per group (and per value of the other grid
    keys), the other sample-count key at its smallest value; dashed: the sqrt(n) and 1/n slopes of
    an average of n independent draws."""
    keys = [a.key for a in report.axes if a.key in SAMPLE_COUNT_KEYS] or [SAMPLE_COUNT_KEYS[0]]
    panels = [(w, key) for w in report.weights for key in keys]
    fig = Figure(figsize=(10, 3.6 * len(panels)))
    axs = fig.subplots(len(panels), 2, squeeze=False)
    styles = ["-", ":", "-."]  # the other grid keys; dashed is the reference slope
    for (weights, key), (snr_ax, var_ax) in zip(panels, axs):
        other = next(k for k in SAMPLE_COUNT_KEYS if k != key)
        results = [r for r in report.results if r.weights == weights]
        fixed = min(r.setting.samples[other] for r in results)
        results = [r for r in results if r.setting.samples[other] == fixed]
        rest = [a.key for a in report.axes if a.key not in SAMPLE_COUNT_KEYS]
        combos = list(dict.fromkeys(tuple(r.setting.assignment[k] for k in rest) for r in results))
        for color, group in enumerate(GROUPS):
            for style, combo in zip(itertools.cycle(styles), combos):
                chosen = sorted((r for r in results if group in r.groups
                                 and tuple(r.setting.assignment[k] for k in rest) == combo),
                                key=lambda r: r.setting.samples[key])
                if not chosen:
                    continue
                label = ", ".join([GROUPS[group], *(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(rest, combo))])
                xs = [r.setting.samples[key] for r in chosen]
                for ax, stat in ((snr_ax, "snr_median"), (var_ax, "variance")):
                    ax.plot(xs, [r.groups[group][stat] for r in chosen], marker="o", linestyle=style,
                            color=f"C{color}", label=label)
        for ax, exponent, title in ((snr_ax, 0.5, "SNR median"), (var_ax, -1.0, "total variance")):
            slope = _reference_slope(ax, exponent)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            values = sorted({r.setting.samples[key] for r in results})
            ax.set_xticks(values, [str(v) for v in values])
            if slope is not None and ax is snr_ax:
                ax.legend(handles=[slope], fontsize=6)
            ax.set_xlabel(f"{key} ({other.rsplit('.', 1)[-1]} = {fixed})")
            ax.set_title(f"{weights} weights: {title}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
        var_ax.legend(fontsize=6)
    o = report.options
    fig.suptitle(f"R = {o.repeats} gradient estimates over K = {o.batches} batches, beta = {o.beta:g}, eval mode",
                 fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)


def _reference_slope(ax, exponent: float):
    """A dashed y ∝ x^exponent through the geometric mean of the lines' values at the smallest x; the
    line drawn (None when there is no line with two points to compare it with)."""
    starts = [(line.get_xdata()[0], line.get_ydata()[0]) for line in ax.get_lines()]
    starts = [(x, y) for x, y in starts if np.isfinite(y) and y > 0]
    xs = sorted({x for line in ax.get_lines() for x in line.get_xdata()})
    if not starts or len(xs) < 2:
        return None
    x0 = min(x for x, _ in starts)
    y0 = float(np.exp(np.mean([np.log(y) for _, y in starts])))
    label = "∝ sqrt(n)" if exponent > 0 else "∝ 1/n"
    return ax.plot(xs, [y0 * (x / x0) ** exponent for x in xs], linestyle="--", color="gray", label=label)[0]


# --------------------------------------------------------------------------- the command


def run_gradients(options: Options) -> tuple[str, list[Path]]:
    """Measure, write gradients.csv, gradients.md and gradients.png into `options.out`; return the
    markdown and the files written."""
    report = measure(options)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    text = format_markdown(report)
    paths = [out / "gradients.csv", out / "gradients.md", out / "gradients.png"]
    write_csv(report, paths[0])
    write_text(paths[1], text)
    plot_gradients(report, paths[2])
    return text, paths
