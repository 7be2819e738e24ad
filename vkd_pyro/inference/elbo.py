"""The ELBO estimators and the one record of the objective's terms (Eq. 8).

The loss is Pyro's own, through its public API: `Trace_ELBO` (`trace`, Monte Carlo KL) or
`TraceMeanField_ELBO` (`meanfield`, analytic KL; only for pairings that have one, see
`vkd_pyro.training.families`), with L particles vectorised, called as
`elbo.differentiable_loss(model, guide, ...)`. :class:`RecordedELBO` hands Pyro the model and guide
each run under an effect handler of its own (:class:`SampleSites`, Pyro's public way to write a
handler) that keeps their sample sites, and reads the terms of Eq. 8 per example from those sites,
with no gradient:

    image_nll = -1/M sum_m log p(y | x_I, z_I^(m))       (site "image_log_lik")
    text_nll  = -1/L sum_l log q(y | z_T^(l))             (site "text_labels"; 0 without L_MI)
    kl        = KL(q(z_T|x_T) || p(z_I|x_I)), unweighted  (site "z"; analytic when registered,
                                                           else the Monte Carlo log q - log p)
    loss      = image_nll + text_nll + beta * KL          (as estimated by the ELBO)

:class:`ObjectiveTerms` is the one place where the names of the terms are defined.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional, Sequence

import torch
from pyro.distributions import Independent, Normal
from pyro.distributions.kl import kl_divergence
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from torch.distributions import Normal as TorchNormal

import vkd_pyro.models.distributions  # noqa: F401  (registers the diagonal <-> low-rank closed-form KLs)


@dataclass
class ObjectiveTerms:
    """The terms of Eq. 8 for one batch, each averaged over its examples: the one record of them."""

    loss: float
    image_nll: float
    text_nll: float
    kl: float
    beta: float

    def as_dict(self) -> dict:
        return asdict(self)


TERM_NAMES = tuple(f.name for f in fields(ObjectiveTerms) if f.name != "beta")  # the estimated terms
RECORDED_SITES = {"image_nll": "image_log_lik", "text_nll": "text_labels"}  # term -> model site (negated)


class RecordedELBO:
    """A Pyro ELBO (`trace` or `meanfield`) whose every loss also leaves the sums of the terms of Eq. 8.

    `differentiable_loss(model, guide, *args, **kwargs)` is the estimator's own (its value and its
    gradient); afterwards `sums` holds, summed over the batch and averaged over the L particles,
    {"image_log_lik", "text_labels", "kl"} as detached tensors (absent when the site is absent), and
    `traces` the (model, guide) sample sites of that loss (:class:`SampleSites`, `.nodes` by name): one
    each with vectorised particles, else one per particle.
    """

    ESTIMATORS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}

    def __init__(self, kind: str, num_particles: int):
        # one particle: one trace without a particle dimension, which only the plate for it would cost
        self.estimator = self.ESTIMATORS[kind](num_particles=num_particles, vectorize_particles=num_particles > 1,
                                               max_plate_nesting=1)
        self.num_particles = num_particles
        self.sums: dict = {}
        self.traces: tuple[list, list] = ([], [])

    @property
    def vectorize_particles(self) -> bool:
        return self.estimator.vectorize_particles

    @vectorize_particles.setter
    def vectorize_particles(self, value: bool) -> None:
        self.estimator.vectorize_particles = value

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        model_traces, guide_traces = [], []
        loss = self.estimator.differentiable_loss(_traced(model, model_traces), _traced(guide, guide_traces),
                                                  *args, **kwargs)
        self.sums = _term_sums(model_traces, guide_traces, weight=1.0 / self.num_particles)
        self.traces = (model_traces, guide_traces)
        return loss


class SampleSites(Messenger):
    """An effect handler that keeps the sample sites of one run as Pyro processed them: `nodes`
    maps a site's name to its message (distribution `fn` as broadcast by the plates, `value`,
    `scale`, `mask`). Pyro's own trace of the same run is unaffected; unlike a second
    `poutine.trace`, nothing is copied and no graph is built."""

    def __init__(self):
        super().__init__()
        self.nodes: dict = {}

    def _pyro_post_sample(self, msg) -> None:
        self.nodes[msg["name"]] = msg


def _traced(fn, traces: list):
    """fn, each of whose runs also leaves its sample sites in `traces` (a :class:`SampleSites`)."""
    def run(*args, **kwargs):
        with SampleSites() as sites:
            out = fn(*args, **kwargs)
        traces.append(sites)
        return out

    return run


@torch.no_grad()
def _term_sums(model_traces: list, guide_traces: list, weight: float) -> dict:
    """The batch sums of the recorded sites' log densities (with their masks) and of KL(q || p) at
    site "z", over the traces of the particles, each weighted by `weight` (1/L: a vectorised trace
    holds all L particles, otherwise there are L traces)."""
    sums: dict = {}
    for model_trace, guide_trace in zip(model_traces, guide_traces):
        for name in RECORDED_SITES.values():
            site = model_trace.nodes.get(name)
            if site is not None:
                log_prob = site["fn"].log_prob(site["value"])
                if site["mask"] is not None:
                    log_prob = log_prob * site["mask"]
                sums[name] = sums.get(name, 0.0) + log_prob.sum() * weight
        if "z" in guide_trace.nodes and "z" in model_trace.nodes:
            sums["kl"] = sums.get("kl", 0.0) + _kl_sum(guide_trace.nodes["z"], model_trace.nodes["z"]) * weight
    return sums


def _kl_sum(guide_site: dict, model_site: dict) -> torch.Tensor:
    """The sum of :func:`_kl` over the site's batch.

    With L vectorised particles Pyro broadcasts both distributions to batch shape (L, B): for two
    diagonal Normals whose parameters are such broadcast views (stride 0), the analytic KL is
    computed once on the shared (B, D) parameters and counted L times, instead of L times over.
    """
    q, p = guide_site["fn"], model_site["fn"]
    shared = _shared_normals(q, p)
    if shared is not None:
        q0, p0, copies = shared
        return kl_divergence(q0, p0).sum() * copies
    return _kl(guide_site, model_site).sum()


def _normal_parameters(fn) -> Optional[tuple]:
    """(loc, scale) of a diagonal Normal with one event dimension, else None."""
    if isinstance(fn, Independent) and fn.reinterpreted_batch_ndims == 1 and isinstance(fn.base_dist, TorchNormal):
        return fn.base_dist.loc, fn.base_dist.scale
    return None


def _shared_normals(q, p):
    """(q0, p0, copies): q and p without the leading batch dimensions along which all their
    parameters are broadcast (stride 0), and how many copies those dimensions hold; None when
    they are not two diagonal Normals of the same batch shape or nothing is broadcast."""
    qp, pp = _normal_parameters(q), _normal_parameters(p)
    if qp is None or pp is None or q.batch_shape != p.batch_shape:
        return None
    tensors = [*qp, *pp]
    if any(t.shape != q.batch_shape + q.event_shape for t in tensors):
        return None
    lead = 0
    while lead < len(q.batch_shape) - 1 and all(t.stride(lead) == 0 for t in tensors):
        lead += 1
    if lead == 0:
        return None
    index = (0,) * lead
    copies = math.prod(q.batch_shape[:lead])
    return Normal(qp[0][index], qp[1][index]).to_event(1), Normal(pp[0][index], pp[1][index]).to_event(1), copies


def _kl(guide_site: dict, model_site: dict) -> torch.Tensor:
    """KL(q || p) at one site, unscaled: analytic where registered, else log q(z) - log p(z)."""
    q, p = guide_site["fn"], model_site["fn"]
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        value = guide_site["value"]
        return q.log_prob(value) - p.log_prob(value)


def is_diagonal_normal(fn) -> bool:
    """Whether `fn` is a diagonal Normal with one event dimension (what :func:`remedied_kl_sum` needs)."""
    return _normal_parameters(fn) is not None


def diagonal_normal_kl(q_loc, q_scale, p_loc, p_scale) -> torch.Tensor:
    """KL(N(q_loc, q_scale^2) || N(p_loc, p_scale^2)) per dimension (no sum), by its closed form
    log(s_p / s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2."""
    return (torch.log(p_scale) - torch.log(q_scale)
            + (q_scale.square() + (q_loc - p_loc).square()) / (2 * p_scale.square()) - 0.5)


def remedied_kl_sum(traces: tuple[Sequence, Sequence], num_particles: int, free_bits: float = 0.0,
                    prior_only: bool = False) -> torch.Tensor:
    """The KL term of a batch as the remedies count it, summed over the batch, averaged over particles.

    For site "z" of each (model trace, guide trace) pair, q = the guide's and p = the model's
    distribution, both diagonal Normals; KL_{b,d} their closed-form KL per record b and dimension d:

        B * sum_d max(free_bits, 1/B sum_b KL_{b,d})

    (free bits, Kingma et al. 2016, Sec. C.8: the batch-mean KL of each dimension counts only above
    lambda = free_bits nats; with free_bits = 0 this is sum_b sum_d KL_{b,d}, the plain KL). With
    `prior_only` q's loc and scale are detached: the term's gradient moves p alone. A vectorised
    trace holds the L particles along a leading dimension: summed, then divided by `num_particles`.
    ValueError when a site is not a pair of diagonal Normals or site "z" is missing.
    """
    total = None
    for model_trace, guide_trace in zip(*traces):
        if "z" not in model_trace.nodes or "z" not in guide_trace.nodes:
            raise ValueError('the KL remedies need a latent site "z" in model and guide')
        q, p = _normal_parameters(guide_trace.nodes["z"]["fn"]), _normal_parameters(model_trace.nodes["z"]["fn"])
        if q is None or p is None:
            raise ValueError("free bits and kl_gradient=prior need a diagonal Normal prior and guide")
        q_loc, q_scale = (t.detach() for t in q) if prior_only else q
        kl = diagonal_normal_kl(q_loc, q_scale, *p)  # (..., B, D)
        batch = kl.shape[-2]
        term = (batch * kl.mean(-2).clamp(min=free_bits).sum(-1)).sum()
        total = term if total is None else total + term
    return total / num_particles


ELBOS = tuple(RecordedELBO.ESTIMATORS)
MEANFIELD_ELBOS = ("meanfield",)  # these need an analytic KL(q || p)


def make_elbo(kind: str, num_particles: int) -> RecordedELBO:
    """The ELBO estimator `kind` (trace | meanfield) with `num_particles` (L) vectorised particles."""
    return RecordedELBO(kind, num_particles)


def term_vector(loss: torch.Tensor, sums: dict, batch_size: int) -> torch.Tensor:
    """The per-example terms (loss, image_nll, text_nll, kl) as one detached float32 tensor of
    shape (4,) on the loss's device, from a batch's summed loss and the recorder's sums.

    No value is read back to the host (no GPU synchronisation): a training loop accumulates these
    on the device and reads them when it chooses.
    """
    loss = loss.detach().float()
    zero = loss.new_zeros(())

    def summed(name: str) -> torch.Tensor:
        value = sums.get(name)
        return value.detach().float() if torch.is_tensor(value) else zero

    values = torch.stack([loss, -summed(RECORDED_SITES["image_nll"]), -summed(RECORDED_SITES["text_nll"]),
                          summed("kl")])
    return values / batch_size


def terms_from_vector(vector: torch.Tensor, beta: float) -> ObjectiveTerms:
    """:class:`ObjectiveTerms` (Python floats: one host read) from a :func:`term_vector`."""
    loss, image_nll, text_nll, kl = vector.tolist()
    return ObjectiveTerms(loss=loss, image_nll=image_nll, text_nll=text_nll, kl=kl, beta=float(beta))


def terms_from_sums(loss: torch.Tensor, sums: dict, batch_size: int, beta: float) -> ObjectiveTerms:
    """Per-example terms from a batch's loss and the recorder's sums."""
    return terms_from_vector(term_vector(loss, sums, batch_size), beta)
