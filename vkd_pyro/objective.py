"""The ELBO estimators and the one record of the objective's terms (Eq. 8).

The loss itself is Pyro's: `Trace_ELBO` (Monte Carlo KL) or `TraceMeanField_ELBO` (analytic KL),
with L particles vectorised. :class:`TermRecorder` only reads the traces Pyro already made, to
report each term of Eq. 8 per example:

    image_nll = -1/M sum_m log p(y | x_I, z_I^(m))       (site "image_log_lik")
    text_nll  = -1/L sum_l log q(y | z_T^(l))             (site "text_labels"; 0 without L_MI)
    kl        = KL(q(z_T|x_T) || p(z_I|x_I)), unweighted  (site "z"; analytic when Pyro has it,
                                                           else the Monte Carlo log q - log p)
    loss      = image_nll + text_nll + beta * KL          (as estimated by the ELBO)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
from pyro.distributions.kl import kl_divergence
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO


@dataclass
class ObjectiveTerms:
    """The terms of Eq. 8 for one batch, each averaged over its examples."""

    loss: float
    image_nll: float
    text_nll: float
    kl: float
    beta: float

    def as_dict(self) -> dict:
        return asdict(self)


class TermRecorder:
    """Mixin for a Pyro ELBO: after each loss, `sums` holds the per-batch sums of the terms."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        self.sums = defaultdict(float)
        return super().differentiable_loss(model, guide, *args, **kwargs)

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        result = super()._differentiable_loss_particle(model_trace, guide_trace)
        weight = 1.0 / self.num_particles  # vectorised: one trace summed over L; else L traces
        for name in ("image_log_lik", "text_labels"):
            if name in model_trace.nodes:
                self.sums[name] += model_trace.nodes[name]["log_prob_sum"].detach() * weight
        if "z" in guide_trace.nodes and "z" in model_trace.nodes:
            self.sums["kl"] += _kl(guide_trace.nodes["z"], model_trace.nodes["z"]).sum().detach() * weight
        return result


def _kl(guide_site: dict, model_site: dict) -> torch.Tensor:
    """KL(q || p) at one site, unscaled: analytic where registered, else log q(z) - log p(z)."""
    q, p = guide_site["fn"], model_site["fn"]
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        value = guide_site["value"]
        return q.log_prob(value) - p.log_prob(value)


class RecordingTraceELBO(TermRecorder, Trace_ELBO):
    """Trace_ELBO: the KL term is estimated by Monte Carlo at the guide's samples."""


class RecordingMeanFieldELBO(TermRecorder, TraceMeanField_ELBO):
    """TraceMeanField_ELBO: the KL term is analytic where Pyro has it."""


ELBOS = {"trace": RecordingTraceELBO, "meanfield": RecordingMeanFieldELBO}


def make_elbo(kind: str, num_particles: int) -> TermRecorder:
    """The ELBO estimator `kind` with `num_particles` (L) vectorised particles."""
    return ELBOS[kind](num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)


def terms_from_sums(loss: torch.Tensor, sums: dict, batch_size: int, beta: float) -> ObjectiveTerms:
    """Per-example terms from a batch's loss and the recorder's sums."""
    def per_example(value) -> float:
        return float(value) / batch_size

    return ObjectiveTerms(
        loss=per_example(loss.detach()),
        image_nll=-per_example(sums.get("image_log_lik", 0.0)),
        text_nll=-per_example(sums.get("text_labels", 0.0)),
        kl=per_example(sums.get("kl", 0.0)),
        beta=float(beta),
    )
