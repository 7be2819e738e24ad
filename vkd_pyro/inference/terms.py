"""The one record of an objective's loss terms: their names, labels and how each is read off a step.

An objective (`vkd_pyro.objectives`) declares the tuple of :class:`Term` it records; everything that
shows or stores terms reads that tuple and nothing else: the ELBO wrapper
(:class:`vkd_pyro.inference.elbo.RecordedELBO` computes each term's batch sum), the training loop's
epoch line, progress bar and `history.csv` (one column per term, in this order), TensorBoard,
`diagnose` (the test ELBO), the divergence check and the sweep's columns. A new term is one more
:class:`Term` in an objective's tuple.

The terms of Eq. 8 (per example, averaged over the batch):

    loss      = image_nll + text_nll + beta * KL   (as the objective's estimator computes it)
    image_nll = -1/M sum_m log p(y | x_I, z_I^(m))  (model site "image_log_lik")
    text_nll  = -1/L sum_l log q(y | z_T^(l))       (model site "text_labels", L_MI)
    kl        = KL(q(z_T|x_T) || p(z_I|x_I)), unweighted (site "z": analytic where registered,
                else the Monte Carlo log q(z) - log p(z) at the guide's draw)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from vkd_pyro.inference.kl import kl_sum

# (model sites, guide sites) of one run -> the sum over the batch (and any particle dimension)
BatchSum = Callable[[Mapping[str, dict], Mapping[str, dict]], Optional[torch.Tensor]]


@dataclass(frozen=True)
class Term:
    """One recorded term: `name` (history.csv column, metrics and sweep key), `label` (the epoch
    line and sweep.md), `short` (the progress bar) and `batch_sum`, which reads its sum over the
    batch off the sample sites of a model run and a guide run (None: the term is the loss itself).
    A term whose sites are absent from a run reads as 0."""

    name: str
    label: str
    short: str
    batch_sum: Optional[BatchSum] = None


def site_nll(site_name: str) -> BatchSum:
    """The batch sum of minus the log density of model site `site_name` at its value, with its mask."""
    def batch_sum(model_sites, guide_sites):
        site = model_sites.get(site_name)
        if site is None:
            return None
        log_prob = site["fn"].log_prob(site["value"])
        if site["mask"] is not None:
            log_prob = log_prob * site["mask"]
        return -log_prob.sum()

    batch_sum.__doc__ = f"-sum log density of model site {site_name!r}"
    return batch_sum


def kl_q_p(model_sites, guide_sites) -> Optional[torch.Tensor]:
    """The batch sum of KL(q || p) at site "z" (q the guide's, p the model's), unscaled: analytic
    where registered (once on the shared parameters when L particles broadcast them), else the Monte
    Carlo log q(z) - log p(z) at the guide's draw."""
    if "z" not in guide_sites or "z" not in model_sites:
        return None
    return kl_sum(guide_sites["z"], model_sites["z"])


LOSS = Term("loss", "loss", "loss")
IMAGE_NLL = Term("image_nll", "image NLL", "img", site_nll("image_log_lik"))
TEXT_NLL = Term("text_nll", "text NLL", "txt", site_nll("text_labels"))
KL = Term("kl", "KL", "kl", kl_q_p)
#: Eq. 8's terms, in the order history.csv has always had them.
EQ8_TERMS = (LOSS, IMAGE_NLL, TEXT_NLL, KL)


def term_names(terms: Sequence[Term]) -> tuple[str, ...]:
    return tuple(term.name for term in terms)


@dataclass
class StepTerms:
    """A step's terms by name (per example), and the KL weight beta it ran with. `values` are
    Python floats, or 0-d device tensors read only when something shows them (the training loop)."""

    values: dict
    beta: float

    def __getattr__(self, name: str):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"no term {name!r} (recorded: {', '.join(values)})")

    def as_dict(self) -> dict:
        return {**self.values, "beta": self.beta}
