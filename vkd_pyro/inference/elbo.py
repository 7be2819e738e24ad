"""The ELBO estimators, which also record the objective's terms (`vkd_pyro.inference.terms`).

The loss is Pyro's own, through its public API: `Trace_ELBO` (`trace`, Monte Carlo KL),
`TraceMeanField_ELBO` (`meanfield`, analytic KL; only for pairings that have one, see
`vkd_pyro.objectives.resolve`) or Trace_ELBO with the path-derivative gradient (`stl`, Roeder et
al. 2017: `vkd_pyro.inference.stl`), with L particles vectorised, called as
`elbo.differentiable_loss(model, guide, ...)`. :class:`RecordedELBO` hands Pyro the model and guide
each run under an effect handler of its own (:class:`SampleSites`, Pyro's public way to write a
handler) that keeps their sample sites, returns them with the loss, and reads the objective's terms
off those sites, with no gradient and no read back to the host (:meth:`RecordedELBO.term_vector`).
The sites live as long as the step that holds them (kept past it, they held every step's
distributions and draws until the next one: 2% of a step at L = M = 1, benchmarks/README.md).
"""

from __future__ import annotations

from typing import Sequence

import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger

from vkd_pyro.inference.stl import PathDerivativeELBO
from vkd_pyro.inference.terms import StepTerms, Term

#: the sample sites of one loss: (model runs, guide runs), a :class:`SampleSites` each
Sites = tuple[list, list]


class RecordedELBO:
    """A Pyro ELBO (`trace`, `meanfield` or `stl`, with L = `num_particles`) whose every loss also
    returns the sample sites its terms are read from.

    :meth:`loss_and_sites` gives the estimator's own loss (its value and its gradient) and the
    (model, guide) sample sites of that loss (:class:`SampleSites`, `.nodes` by name): one run each
    with vectorised particles, else one per particle; :meth:`term_vector` reads the objective's terms
    off them. Nothing is kept between calls: the sites hold the step's distributions and draws, which
    the caller lets go with the step.
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

    def loss_and_sites(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, Sites]:
        """(the estimator's `differentiable_loss(model, guide, *args, **kwargs)`, the (model runs,
        guide runs) sample sites it was computed from)."""
        model_runs, guide_runs = [], []
        loss = self.estimator.differentiable_loss(_traced(model, model_runs), _traced(guide, guide_runs),
                                                  *args, **kwargs)
        return loss, (model_runs, guide_runs)

    @torch.no_grad()
    def term_vector(self, terms: Sequence[Term], loss: torch.Tensor, sites: Sites, batch_size: int) -> torch.Tensor:
        """The per-example `terms` of a loss and its `sites` (:meth:`loss_and_sites`) as one detached
        float32 tensor (len(terms),) on the loss's device: each term's batch sum (the loss itself for
        a term without `batch_sum`; 0 where its sites are absent), averaged over the L particles,
        divided by `batch_size`.

        No value is read back to the host (no GPU synchronisation): a training loop accumulates these
        on the device and reads them when it chooses.
        """
        weight = 1.0 / self.num_particles
        sums = []
        for term in terms:
            if term.batch_sum is None:
                sums.append(loss)  # already the mean over the L particles
                continue
            total = None
            for model_sites, guide_sites in zip(*sites):
                value = term.batch_sum(model_sites.nodes, guide_sites.nodes)
                if value is not None:
                    total = value if total is None else total + value
            sums.append(loss.new_zeros(()) if total is None else total if weight == 1.0 else total * weight)
        return torch.stack([value.float() for value in sums]) / batch_size


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


def _traced(fn, runs: list):
    """fn, each of whose runs also leaves its sample sites in `runs` (a :class:`SampleSites`)."""
    def run(*args, **kwargs):
        with SampleSites() as sites:
            out = fn(*args, **kwargs)
        runs.append(sites)
        return out

    return run
