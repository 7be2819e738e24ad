"""The ELBO estimators, which also record the objective's terms (`vkd_pyro.inference.terms`).

The loss is Pyro's own, through its public API: `Trace_ELBO` (`trace`, Monte Carlo KL),
`TraceMeanField_ELBO` (`meanfield`, analytic KL; only for pairings that have one, see
`vkd_pyro.objectives.resolve`) or Trace_ELBO with the path-derivative gradient (`stl`, Roeder et
al. 2017: `vkd_pyro.inference.stl`), with L particles vectorised, called as
`elbo.differentiable_loss(model, guide, ...)`. :class:`RecordedELBO` hands Pyro the model and guide
each run under an effect handler of its own (:class:`SampleSites`, Pyro's public way to write a
handler) that keeps their sample sites, and reads the objective's terms off those sites, with no
gradient and no read back to the host (:meth:`RecordedELBO.term_vector`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger

from vkd_pyro.inference.stl import PathDerivativeELBO
from vkd_pyro.inference.terms import StepTerms, Term


class RecordedELBO:
    """A Pyro ELBO (`trace`, `meanfield` or `stl`, with L = `num_particles`) whose every loss also leaves
    the sample sites its terms are read from.

    `differentiable_loss(model, guide, *args, **kwargs)` is the estimator's own (its value and its
    gradient); afterwards `traces` holds the (model, guide) sample sites of that loss
    (:class:`SampleSites`, `.nodes` by name): one run each with vectorised particles, else one per
    particle; :meth:`term_vector` reads the objective's terms off them.
    """

    ESTIMATORS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO, "stl": PathDerivativeELBO}
    ANALYTIC_KL = ("meanfield",)  # these need an analytic KL(q || p)
    PATH_DERIVATIVE = ("stl",)  # these score log q with the guide's parameters detached (no flow guide)

    def __init__(self, kind: str, num_particles: int, vectorize_particles: bool = True):
        # one particle: one trace without a particle dimension, which only the plate for it would cost
        self.estimator = self.ESTIMATORS[kind](num_particles=num_particles,
                                               vectorize_particles=vectorize_particles and num_particles > 1,
                                               max_plate_nesting=1)
        self.num_particles = num_particles
        self.traces: tuple[list, list] = ([], [])

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        model_traces, guide_traces = [], []
        loss = self.estimator.differentiable_loss(_traced(model, model_traces), _traced(guide, guide_traces),
                                                  *args, **kwargs)
        self.traces = (model_traces, guide_traces)
        return loss

    @torch.no_grad()
    def term_vector(self, terms: Sequence[Term], loss: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The per-example `terms` of the last loss as one detached float32 tensor (len(terms),) on the
        loss's device: each term's batch sum (the loss itself for a term without `batch_sum`; 0 where
        its sites are absent), averaged over the L particles, divided by `batch_size`.

        No value is read back to the host (no GPU synchronisation): a training loop accumulates these
        on the device and reads them when it chooses.
        """
        loss = loss.detach().float()
        weight = 1.0 / self.num_particles
        values = []
        for term in terms:
            if term.batch_sum is None:
                values.append(loss)
                continue
            total = None
            for model_sites, guide_sites in zip(*self.traces):
                value = term.batch_sum(model_sites.nodes, guide_sites.nodes)
                if value is not None:
                    total = value if total is None else total + value
            values.append(loss.new_zeros(()) if total is None else total.detach().float() * weight)
        return torch.stack(values) / batch_size


def read_terms(terms: Sequence[Term], vector: torch.Tensor, beta: float) -> StepTerms:
    """:class:`StepTerms` of Python floats (one host read) from a term vector."""
    return StepTerms(dict(zip((t.name for t in terms), vector.tolist())), float(beta))


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
