"""The ELBO estimators and the one record of the objective's terms (Eq. 8).

The loss itself is Pyro's: `Trace_ELBO` (`trace`, Monte Carlo KL) or `TraceMeanField_ELBO`
(`meanfield`, analytic KL; only for pairings that have one, see `vkd_pyro.families`), with L
particles vectorised; `jit_trace` and `jit_meanfield` are the same, compiled (`vkd_pyro.compiled`).
:class:`TermRecorder` only reads the traces Pyro already made, to report each term of Eq. 8 per
example:

    image_nll = -1/M sum_m log p(y | x_I, z_I^(m))       (site "image_log_lik")
    text_nll  = -1/L sum_l log q(y | z_T^(l))             (site "text_labels"; 0 without L_MI)
    kl        = KL(q(z_T|x_T) || p(z_I|x_I)), unweighted  (site "z"; analytic when Pyro has it,
                                                           else the Monte Carlo log q - log p)
    loss      = image_nll + text_nll + beta * KL          (as estimated by the ELBO)
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from pyro.distributions import Independent, Normal
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import is_identically_zero
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import Normal as TorchNormal

import vkd_pyro.kl  # noqa: F401  (registers the diagonal <-> low-rank closed-form KLs)


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
        """The mean over the L particles of each particle's surrogate loss.

        For a fully reparameterised guide (all of this project's) the surrogate's value is the
        loss, so, unlike Pyro's own `differentiable_loss` (which adds `loss - surrogate.item()` and
        a NaN check), nothing is read back to the host: no GPU synchronisation in a training step.
        Where a particle's loss comes back as a Python number (Pyro's particle code for a
        non-reparameterised site, or TraceMeanField's), that value is kept, with the surrogate's
        gradient, exactly as Pyro does.
        """
        self.sums = defaultdict(float)
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss_particle, surrogate_particle = self._differentiable_loss_particle(model_trace, guide_trace)
            if not torch.is_tensor(loss_particle):
                surrogate_particle = loss_particle + (surrogate_particle - surrogate_particle.detach())
            loss = loss + surrogate_particle / self.num_particles
        return loss

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        result = super()._differentiable_loss_particle(model_trace, guide_trace)
        weight = 1.0 / self.num_particles  # vectorised: one trace summed over L; else L traces
        for name in ("image_log_lik", "text_labels"):
            if name in model_trace.nodes:
                self.sums[name] += model_trace.nodes[name]["log_prob_sum"].detach() * weight
        if "z" in guide_trace.nodes and "z" in model_trace.nodes:
            with torch.no_grad():  # a record only: no graph for its (possibly Monte Carlo) KL
                self.sums["kl"] += _kl_sum(guide_trace.nodes["z"], model_trace.nodes["z"]) * weight
        return result


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


class _HostFreeTraceELBO(Trace_ELBO):
    """Trace_ELBO whose particle loss stays a tensor (Pyro's reads each site's value with .item())
    when no guide site needs a score-function term, i.e. the guide is fully reparameterised."""

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        guide_sites = [site for site in guide_trace.nodes.values() if site["type"] == "sample"]
        if any(not is_identically_zero(site["score_parts"].score_function) for site in guide_sites):
            return super()._differentiable_loss_particle(model_trace, guide_trace)
        elbo = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo = elbo + site["log_prob_sum"]
        for site in guide_sites:
            entropy = site["score_parts"].entropy_term  # the (scaled) log q of a reparameterised site
            if not is_identically_zero(entropy):
                elbo = elbo - entropy.sum()
        return -elbo, -elbo


class RecordingTraceELBO(TermRecorder, _HostFreeTraceELBO):
    """Trace_ELBO: the KL term is estimated by Monte Carlo at the guide's samples."""


class RecordingMeanFieldELBO(TermRecorder, TraceMeanField_ELBO):
    """TraceMeanField_ELBO: the KL term is analytic where Pyro has it."""


ELBOS = {"trace": RecordingTraceELBO, "meanfield": RecordingMeanFieldELBO}
JIT_ELBOS = {"jit_trace": "trace", "jit_meanfield": "meanfield"}  # compiled versions of these
MEANFIELD_ELBOS = ("meanfield", "jit_meanfield")  # these need an analytic KL(q || p)


def make_elbo(kind: str, num_particles: int) -> TermRecorder:
    """The ELBO estimator `kind` with `num_particles` (L) vectorised particles (one particle: one
    trace without a particle dimension, which only the plate for it would cost)."""
    if kind in JIT_ELBOS:
        from vkd_pyro.compiled import CompiledELBO

        return CompiledELBO(make_elbo(JIT_ELBOS[kind], num_particles))
    return ELBOS[kind](num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1)


TERM_NAMES = ("loss", "image_nll", "text_nll", "kl")


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

    values = torch.stack([loss, -summed("image_log_lik"), -summed("text_labels"), summed("kl")])
    return values / batch_size


def terms_from_vector(vector: torch.Tensor, beta: float) -> ObjectiveTerms:
    """:class:`ObjectiveTerms` (Python floats: one host read) from a :func:`term_vector`."""
    loss, image_nll, text_nll, kl = vector.tolist()
    return ObjectiveTerms(loss=loss, image_nll=image_nll, text_nll=text_nll, kl=kl, beta=float(beta))


def terms_from_sums(loss: torch.Tensor, sums: dict, batch_size: int, beta: float) -> ObjectiveTerms:
    """Per-example terms from a batch's loss and the recorder's sums."""
    return terms_from_vector(term_vector(loss, sums, batch_size), beta)
