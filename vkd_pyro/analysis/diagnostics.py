"""Diagnostics of a trained VKD module, and the per-step training logger.

Everything here reads a trained :class:`~vkd_pyro.inference.module.VKDModule` in eval mode (dropout off) under
``torch.no_grad`` and a data split (a :class:`~vkd_pyro.data.batching.PairedSplit`):

- :func:`elbo_terms`: minus Eq. 8 and its terms (image NLL, text NLL, KL) per example on a split, at
  beta = 1: the training objective measured on held-out records.
- :func:`latent_statistics`, :func:`active_units`, :func:`diagonal_gaussian_kl`: posterior collapse.
  A latent unit d is *active* (Burda et al. 2015, "Importance Weighted Autoencoders", Sec. 5.2) when
  Cov_x(E_q[z_d | x]) > 0.01; here the covariance is over the records of the split and the means are
  those of the EHR posterior q(z_T | x_T) (of the prior p(z_I | x_I) too, reported apart). For diagonal
  Gaussian families the KL(q || p) is also split per dimension and averaged over records.
- :func:`importance_log_marginal`, :func:`held_out_log_likelihood`: an estimate of the quantity the
  method bounds, log p(y | x_I) = log E_{p(z|x_I)} p(y | x_I, z) (Eq. 2), by importance sampling with
  K samples: with the guide as proposal (reports available),
      log 1/K sum_k p(y | x_I, z_k) p(z_k | x_I) / q(z_k | x_T),   z_k ~ q(z | x_T),
  and with the prior as proposal (images alone; the plain Monte Carlo average),
      log 1/K sum_k p(y | x_I, z_k),   z_k ~ p(z | x_I),
  both with logsumexp. Either is a stochastic lower bound in expectation (Jensen) that tightens as K
  grows and is consistent as K -> infinity.
- :func:`expected_calibration_error`: ECE of the Monte Carlo predictive over all (record, class) pairs,
  with equal-width bins on [0, 1] (10 by default): sum_b n_b / N |mean(y in b) - mean(p in b)|.
- :func:`samples_curve`: the Monte Carlo error of the predictive against the number S of prior draws:
  the standard error sd_s(p_s) / sqrt(S) of each probability and the spread of the macro AUC over
  independent redraws, with the seconds each takes.
- :func:`diagnose`: all of the above for a run folder, written to ``diagnostics.json``.
- :class:`TrainingLogger`: what `vkd_pyro.training.loop.fit` calls once a step and once an epoch: the ELBO terms
  to TensorBoard (``<run>/tensorboard/``, when ``train.tensorboard`` is true) and the step rate.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from vkd_pyro.analysis.runs import load_run
from vkd_pyro.classes import CLASSES
from vkd_pyro.data.batching import collate
from vkd_pyro.data.prepare import prepare_data
from vkd_pyro.data.splits import split_label_mask
from vkd_pyro.errors import UserError
from vkd_pyro.files import write_json
from vkd_pyro.models.vkd import bernoulli_log_lik
from vkd_pyro.training.evaluate import auc_metrics, predict_split, seeded

ACTIVE_THRESHOLD = 0.01  # Burda et al. 2015
DEFAULT_BINS = 10
DEFAULT_IS_SAMPLES = 64
DEFAULT_CURVE = (1, 4, 16, 64, 256)  # the numbers S of prior draws samples_curve measures


# --------------------------------------------------------------------------- helpers


def _loader(split, batch_size: int) -> DataLoader:
    return DataLoader(split, batch_size=batch_size, shuffle=False, collate_fn=collate)


def distribution_mean(distribution, samples: int = 256) -> torch.Tensor:
    """E[z] of a family's distribution: its `mean` where it has one, else (e.g. a normalising flow)
    the mean of `samples` draws (reparameterised where possible, so that Grad-CAM can differentiate)."""
    try:
        return distribution.mean
    except NotImplementedError:
        draws = distribution.rsample((samples,)) if distribution.has_rsample else distribution.sample((samples,))
        return draws.mean(0)


def diagonal_normal(distribution) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(loc, scale) of a diagonal Gaussian (Normal, or Independent of Normal); None for other families."""
    base = distribution
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    if isinstance(base, torch.distributions.Normal):
        return base.loc, base.scale
    return None


# --------------------------------------------------------------------------- ELBO terms


@torch.no_grad()
def elbo_terms(module, split, batch_size: int = 256, device="cpu", seed: Optional[int] = 0) -> dict:
    """The mean per-example terms the module's objective records (`module.terms`: for vkd the loss,
    minus Eq. 8, image NLL, text NLL and KL) on `split` at beta = 1.

    The module's own estimator (VKDModule.forward, L guide and M prior samples as configured) in eval
    mode. The loss of `image_only` is its image NLL alone (no text term, no KL).
    """
    module.eval()
    names = [term.name for term in module.terms]
    totals = dict.fromkeys(names, 0.0)
    count = 0
    with seeded(seed, device):
        for batch in _loader(split, batch_size):
            _, terms = module(batch.to(device), 1.0)
            for key in names:
                totals[key] += getattr(terms, key) * batch.size
            count += batch.size
    out = {key: totals[key] / max(count, 1) for key in names}
    out.update(beta=1.0, n=count)
    return out


# --------------------------------------------------------------------------- posterior collapse


@torch.no_grad()
def latent_statistics(module, split, batch_size: int = 256, device="cpu", with_guide: bool = True) -> dict:
    """Means of p(z_I | x_I) and (`with_guide`: the objective has q(z_T | x_T)) of the guide per record,
    and for diagonal Gaussians the KL(q || p) per dimension per record. Arrays (N, D) as numpy; missing
    parts are None. (Means of families without a closed form, e.g. flows, are Monte Carlo: see
    distribution_mean.)"""
    module.eval()
    model = module.model
    prior_means, guide_means, kl_dims, labels = [], [], [], []
    for batch in _loader(split, batch_size):
        batch = batch.to(device)
        prior = model.prior(model.image_encoder(batch.images))
        prior_means.append(distribution_mean(prior).cpu())
        labels.append(batch.labels.cpu())
        if with_guide and batch.token_states is not None:
            posterior = module.guide.posterior(batch.token_states, batch.token_mask)
            guide_means.append(distribution_mean(posterior).cpu())
            q, p = diagonal_normal(posterior), diagonal_normal(prior)
            if q is not None and p is not None:
                kl_dims.append(diagonal_gaussian_kl(q[0], q[1], p[0], p[1]).cpu())
    cat = lambda parts: torch.cat(parts).numpy() if parts else None  # noqa: E731
    return {"prior_mean": cat(prior_means), "guide_mean": cat(guide_means), "kl_per_dim": cat(kl_dims),
            "labels": cat(labels)}


def diagonal_gaussian_kl(q_loc, q_scale, p_loc, p_scale) -> torch.Tensor:
    """KL(N(q_loc, q_scale^2) || N(p_loc, p_scale^2)) elementwise (per dimension); sum the last dim
    for the KL of the diagonal Gaussians."""
    ratio = (q_scale / p_scale) ** 2
    return 0.5 * (ratio + ((q_loc - p_loc) / p_scale) ** 2 - 1.0 - torch.log(ratio))


def active_units(means: np.ndarray, threshold: float = ACTIVE_THRESHOLD) -> tuple[int, np.ndarray]:
    """(count, per-dimension variance): unit d is active when Var_x(E_q[z_d | x]) > threshold.

    `means` (N, D) are the posterior means of N records; the variance is over records (ddof=0)."""
    means = np.asarray(means, dtype=np.float64)
    if means.ndim != 2 or means.shape[0] < 2:
        raise ValueError(f"active units need the means of at least 2 records as (N, D); got {means.shape}")
    variance = means.var(axis=0)
    return int((variance > threshold).sum()), variance


# --------------------------------------------------------------------------- log p(y | x_I)


def importance_log_marginal(log_lik: Callable[[torch.Tensor], torch.Tensor], prior, proposal=None,
                            num_samples: int = DEFAULT_IS_SAMPLES, chunk: int = 64) -> torch.Tensor:
    """Importance-sampling estimate of log integral p(y|z) p(z) dz, per batch element.

    log_lik(z) maps samples (k, B, D) to log p(y | z) (k, B); `prior` and `proposal` are distributions
    with batch shape (B,). With `proposal` None the prior is the proposal (plain Monte Carlo):
    log 1/K sum_k p(y|z_k); otherwise log 1/K sum_k p(y|z_k) p(z_k) / q(z_k). Samples are drawn in
    chunks of `chunk` and combined with logsumexp. Returns (B,).
    """
    if num_samples < 1:
        raise ValueError(f"importance sampling needs K >= 1 samples, got {num_samples}")
    parts = []
    for start in range(0, num_samples, chunk):
        k = min(chunk, num_samples - start)
        if proposal is None:
            z = prior.sample((k,))
            log_w = log_lik(z)
        else:
            z = proposal.sample((k,))
            log_w = log_lik(z) + prior.log_prob(z) - proposal.log_prob(z)
        parts.append(torch.logsumexp(log_w, dim=0))
    return torch.logsumexp(torch.stack(parts), dim=0) - math.log(num_samples)


@torch.no_grad()
def held_out_log_likelihood(module, split, num_samples: int = DEFAULT_IS_SAMPLES, proposal: str = "prior",
                            batch_size: int = 256, device="cpu", seed: Optional[int] = 0) -> np.ndarray:
    """Per-record estimate of log p(y | x_I) (Eq. 2), in nats, by :func:`importance_log_marginal`.

    proposal: "prior" (p(z_I | x_I), images alone) or "guide" (q(z_T | x_T), needs reports and an
    objective with a guide).
    """
    if proposal not in ("prior", "guide"):
        raise ValueError(f"proposal must be prior or guide, got {proposal!r}")
    if proposal == "guide" and not hasattr(module.guide, "posterior"):
        raise ValueError("the guide proposal needs a guide q(z_T|x_T) (an objective with one, e.g. vkd)")
    module.eval()
    model = module.model
    out = []
    with seeded(seed, device):
        for batch in _loader(split, batch_size):
            batch = batch.to(device)
            features = model.image_encoder(batch.images)
            prior = model.prior(features)
            q = None
            if proposal == "guide":
                if batch.token_states is None:
                    raise ValueError("the guide proposal needs the split's report token states")
                q = module.guide.posterior(batch.token_states, batch.token_mask)

            def log_lik(z, features=features, batch=batch):
                return bernoulli_log_lik(model.class_logits(z, features), batch.labels, batch.label_mask)

            out.append(importance_log_marginal(log_lik, prior, q, num_samples).cpu())
    return torch.cat(out).numpy()


# --------------------------------------------------------------------------- calibration


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS,
                               mask: Optional[np.ndarray] = None) -> dict:
    """ECE over all (record, class) pairs with `bins` equal-width bins of the predicted probability.

    `mask` (N, C), when given, leaves out the pairs where it is 0 (unknown labels: the ignore policy,
    classes a dataset does not label), exactly as the AUCs of metrics.json do.

    Pair i goes to bin floor(p_i * bins) (p = 1 into the last); ECE = sum_b n_b / N |f_b - c_b| with
    f_b the fraction of positive labels and c_b the mean probability in bin b. Returns the ECE and a
    per-bin table (lower/upper edge, count, confidence, frequency; empty bins have count 0).
    """
    p = np.asarray(probs, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if mask is not None and p.shape == y.shape:
        keep = np.asarray(mask).ravel() > 0
        p, y = p[keep], y[keep]
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"probs and labels must have the same non-empty shape; got {np.shape(probs)} and {np.shape(labels)}")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    index = np.clip(np.floor(p * bins).astype(int), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        inside = index == b
        n = int(inside.sum())
        confidence = float(p[inside].mean()) if n else None
        frequency = float(y[inside].mean()) if n else None
        if n:
            ece += n / p.size * abs(frequency - confidence)
        table.append({"lower": b / bins, "upper": (b + 1) / bins, "count": n,
                      "confidence": confidence, "frequency": frequency})
    return {"ece": float(ece), "bins": bins, "pairs": int(p.size), "table": table}


# --------------------------------------------------------------------------- Monte Carlo error against S


def samples_curve(module, split, config, device="cpu", samples=DEFAULT_CURVE, redraws: int = 8,
                  seed: int = 0) -> list[dict]:
    """The Monte Carlo error of the test predictive (Algorithm 2) against the number S of prior draws:
    one :func:`samples_row` for each S in `samples`. ValueError for fewer than 2 redraws or an S < 1."""
    if redraws < 2 or any(S < 1 for S in samples):
        raise ValueError(f"samples_curve needs >= 2 redraws and S >= 1, got {redraws} and {tuple(samples)}")
    return [samples_row(module, split, config, device, S, redraws, seed) for S in samples]


_samples_curve = samples_curve  # diagnose's parameter of the same name hides the function there


def samples_row(module, split, config, device, S: int, redraws: int, seed: int) -> dict:
    """One row of :func:`samples_curve`: `redraws` independent predictives p_hat = 1/S sum_s p_s of
    `split` with S prior draws each (:func:`predictive_redraws`), summarised as

    - mc_se_median, mc_se_p90: the median and 90th percentile, over records, classes and redraws, of
      the Monte Carlo standard error of each probability (:func:`mc_standard_errors`);
    - macro_auc_mean, macro_auc_sd: the mean and sd (ddof 1) over the redraws of the macro AUC
      (`auc_metrics`: masked labels left out, the classes of data.eval_classes; None where undefined);
    - seconds: the mean wall time of one redraw.
    """
    means, sds, aucs, seconds = predictive_redraws(module, split, config, device, S, redraws, seed)
    errors, source = mc_standard_errors(means, sds, S)
    defined = None not in aucs
    return {"S": int(S), "redraws": int(redraws), "mc_se_median": float(np.median(errors)),
            "mc_se_p90": float(np.percentile(errors, 90)), "mc_se_from": source,
            "macro_auc_mean": float(np.mean(aucs)) if defined else None,
            "macro_auc_sd": float(np.std(aucs, ddof=1)) if defined else None,
            "seconds": float(np.mean(seconds))}


def predictive_redraws(module, split, config, device, S: int, redraws: int, seed: int) -> tuple:
    """`redraws` independent runs of `predict_split` with S prior draws (batches of
    train.eval_batch_size; torch seeded to seed, seed + 1, ...): each run's mean probabilities (N, C),
    their sd over the S draws (ddof 0, (N, C)), macro AUC and wall seconds, as four lists."""
    mask, batch_size = split_label_mask(split), config.train.eval_batch_size
    means, sds, aucs, seconds = [], [], [], []
    for redraw in range(redraws):
        start = time.perf_counter()
        with seeded(seed + redraw, device):
            probs, sd, labels = predict_split(module, split, S, batch_size, device)
        seconds.append(time.perf_counter() - start)
        means.append(probs)
        sds.append(sd)
        aucs.append(auc_metrics(labels, probs, CLASSES, mask, config.data.eval_classes)["macro_auc"])
    return means, sds, aucs, seconds


def mc_standard_errors(means: list, sds: list, S: int) -> tuple[np.ndarray, str]:
    """The Monte Carlo standard error of each predicted probability p_hat = 1/S sum_s p_s, and where
    it comes from. For S > 1, from the draws of each redraw:

        se = sd_s(p_s) / sqrt(S)   with sd of ddof 1,  = sd0 / sqrt(S - 1)  for predict_split's ddof-0 sd0

    (R, N, C) for R redraws ("draws"). For S = 1 one draw has no spread, so the sd (ddof 1) of p_hat
    across the R redraws, (N, C) ("redraws"). An sd from few draws is noisy, and its median lies below
    the true sd (for Gaussian draws by the median of chi_{k}/sqrt(k), k = S - 1: 0.89 at S = 4, 0.98 at
    S = 16), so that the median s.e. falls as 1/sqrt(S) from S of about 16 on."""
    if S == 1:
        return np.std(np.stack(means), axis=0, ddof=1), "redraws"
    return np.stack(sds) / math.sqrt(S - 1), "draws"


# --------------------------------------------------------------------------- one run


def summarize(module, split, config, device="cpu", is_samples: int = DEFAULT_IS_SAMPLES,
              bins: int = DEFAULT_BINS, seed: int = 0, probs=None, labels=None, with_guide: bool = False,
              test_elbo: bool = True) -> dict:
    """The scalar diagnostics of an image model on a split: the objective's terms at beta = 1 (where
    `test_elbo`: its loss can be evaluated on held-out records), log p(y|x_I) (both proposals
    `with_guide`: the objective has q(z_T|x_T)), the ECE of the predictive with S = inference.test_samples."""
    batch_size = config.train.eval_batch_size
    out = {"elbo": elbo_terms(module, split, batch_size, device, seed)} if test_elbo else {}
    log_lik = {"K": int(is_samples), "prior_proposal": float(np.mean(
        held_out_log_likelihood(module, split, is_samples, "prior", batch_size, device, seed)))}
    if with_guide and getattr(split, "token_states", None) is not None:
        log_lik["guide_proposal"] = float(np.mean(
            held_out_log_likelihood(module, split, is_samples, "guide", batch_size, device, seed)))
    out["log_p_y_given_x"] = log_lik
    if probs is None:
        with seeded(seed, device):
            probs, _, labels = predict_split(module, split, config.inference.test_samples, batch_size, device)
    out["calibration"] = expected_calibration_error(probs, labels, bins, split_label_mask(split))
    out["calibration"]["S"] = int(config.inference.test_samples)
    return out


def collapse_report(stats: dict, threshold: float = ACTIVE_THRESHOLD) -> dict:
    """Active units of the guide's and the prior's means and the per-dimension KL, from latent_statistics."""
    out = {"threshold": threshold}
    for name in ("guide", "prior"):
        means = stats.get(f"{name}_mean")
        if means is not None and len(means) >= 2:
            count, variance = active_units(means, threshold)
            out[f"{name}_active_units"] = count
            out[f"{name}_mean_variance"] = variance.tolist()
            out["z_dim"] = int(means.shape[1])
    if stats.get("kl_per_dim") is not None:
        kl = stats["kl_per_dim"].mean(axis=0)
        out["kl_per_dim"] = kl.tolist()
        out["kl_total"] = float(kl.sum())
        out["kl_dims_above_0.01"] = int((kl > 0.01).sum())
    return out


def diagnose(run_dir, split: str = "test", is_samples: int = DEFAULT_IS_SAMPLES, bins: int = DEFAULT_BINS,
             seed: int = 0, trust_code: bool = False, samples_curve=DEFAULT_CURVE) -> dict:
    """Write `<run>/diagnostics.json` (diagnostics_<split>.json for other splits) and return it.
    trust_code: import a prior, guide or objective the run's config names by import path (`load_run`).
    samples_curve: the numbers S of prior draws of the "samples_curve" rows (:func:`samples_curve`,
    8 redraws each); empty: none. A run whose objective has no image model (text_only) is a one-line
    UserError."""
    run = load_run(run_dir, trust_code=trust_code)
    objective = run.objective
    if objective.predicts_from != "images":
        raise UserError(f"{run_dir}: diagnose reads the image model, and a {objective.name} run has none "
                        "(its figures on the reports are in metrics.json)")
    data = prepare_data(run.config, with_reports=objective.reads_reports)
    module, device = run.module, run.device
    part = data.splits[split]
    result = {"run": str(run_dir), "split": split, "n": len(part), "objective": objective.name,
              "dataset": run.config.data.name, "seed": seed}
    result.update(summarize(module, part, run.config, device, is_samples, bins, seed, with_guide=objective.has_guide,
                            test_elbo=objective.test_elbo))
    stats = latent_statistics(module, part, run.config.train.eval_batch_size, device, with_guide=objective.has_guide)
    result["latent"] = collapse_report(stats)
    if samples_curve:
        result["samples_curve"] = _samples_curve(module, part, run.config, device, samples_curve, seed=seed)
    suffix = "" if split == "test" else f"_{split}"
    write_json(Path(run_dir) / f"diagnostics{suffix}.json", result)
    return result


def format_diagnostics(result: dict) -> str:
    """A few lines for the terminal."""
    lik, cal, lat = result["log_p_y_given_x"], result["calibration"], result["latent"]
    terms = {k: v for k, v in result.get("elbo", {}).items() if k not in ("beta", "n")}
    lines = [f"{result['split']} split, {result['n']} records, objective {result['objective']}",
             "  terms at beta=1 (per record): " + ("  ".join(f"{k} {v:.4f}" for k, v in terms.items())
                                                   or "none (the objective's loss needs training records)"),
             f"  log p(y|x_I), K={lik['K']}: prior proposal {lik['prior_proposal']:.4f}"
             + (f", guide proposal {lik['guide_proposal']:.4f}" if "guide_proposal" in lik else "") + " nats",
             f"  ECE ({cal['bins']} equal-width bins, {cal['pairs']} record-class pairs, S={cal['S']}): {cal['ece']:.4f}"]
    if "z_dim" in lat:
        units = [f"{name} means {lat[f'{name}_active_units']}/{lat['z_dim']}" for name in ("guide", "prior")
                 if f"{name}_active_units" in lat]
        lines.append(f"  active units (Var_x E[z_d] > {lat['threshold']}): " + ", ".join(units))
    if "kl_total" in lat:
        lines.append(f"  KL(q||p) per record {lat['kl_total']:.4f}, {lat['kl_dims_above_0.01']}/{len(lat['kl_per_dim'])} "
                     f"dimensions with mean KL > 0.01")
    if result.get("samples_curve"):
        lines += format_samples_curve(result["samples_curve"])
    return "\n".join(lines)


def format_samples_curve(rows: list[dict]) -> list[str]:
    """The rows of :func:`samples_curve` as a small table: S, the median Monte Carlo standard error of a
    probability, the macro AUC's mean and sd over the redraws, the seconds of one redraw."""
    lines = [f"  Monte Carlo error of the predictive against S ({rows[0]['redraws']} redraws each; "
             "*: s.e. from the spread across redraws)",
             f"  {'S':>6}  {'MC s.e. median':>14}  {'macro AUC mean ± sd':>19}  {'s / redraw':>10}"]
    for row in rows:
        auc = ("-" if row["macro_auc_mean"] is None
               else f"{row['macro_auc_mean']:.3f} ± {row['macro_auc_sd']:.3f}")
        mark = "*" if row["mc_se_from"] == "redraws" else " "
        lines.append(f"  {row['S']:>6}  {row['mc_se_median']:>13.4f}{mark}  {auc:>19}  {row['seconds']:>10.3f}")
    return lines


# --------------------------------------------------------------------------- training logger

