"""KL(q || p) at the latent site "z": the recorded term and the explicit KL terms objectives add.

`kl_sum` is what the record reads (analytic where registered, computed once on the shared
parameters when L particles broadcast them); `free_bits_kl_sum` is the remedies' KL term (free
bits, Kingma et al. 2016; kl_gradient=prior); `explicit_kl_sum` adds an objective's own KL term,
from the (model, guide) sample sites of each particle's run, to the loss.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from pyro.distributions import Independent
from pyro.distributions.kl import kl_divergence
from torch.distributions import Distribution
from torch.distributions import Normal as TorchNormal

import vkd_pyro.models.distributions  # noqa: F401  (registers the diagonal <-> low-rank closed-form KLs)

#: (q, p) -> the KL term's sum over the batch (and over a leading particle dimension)
KLSum = Callable[[Distribution, Distribution], torch.Tensor]


def kl_sum(guide_site: dict, model_site: dict) -> torch.Tensor:
    """The sum over the site's batch of KL(q || p), unscaled: analytic where registered, else
    log q(z) - log p(z) at the guide's draw.

    Two diagonal Normals (the paper's pair) take the closed form of :func:`diagonal_normal_kl_sum`
    directly on their parameters; with L vectorised particles Pyro broadcasts both to batch shape
    (L, B), and where their parameters are such broadcast views (stride 0) the KL is computed once
    on the shared (B, D) parameters and counted L times, instead of L times over.
    """
    q, p = guide_site["fn"], model_site["fn"]
    qp, pp = normal_parameters(q), normal_parameters(p)
    if qp is not None and pp is not None and q.batch_shape == p.batch_shape:
        tensors, copies = _unbroadcast([*qp, *pp], len(q.batch_shape))
        total = diagonal_normal_kl_sum(*tensors)
        return total if copies == 1 else total * copies
    try:
        return kl_divergence(q, p).sum()
    except NotImplementedError:
        value = guide_site["value"]
        return (q.log_prob(value) - p.log_prob(value)).sum()


def normal_parameters(fn) -> Optional[tuple]:
    """(loc, scale) of a diagonal Normal with one event dimension, else None."""
    if isinstance(fn, Independent) and fn.reinterpreted_batch_ndims == 1 and isinstance(fn.base_dist, TorchNormal):
        return fn.base_dist.loc, fn.base_dist.scale
    return None


def is_diagonal_normal(fn) -> bool:
    """Whether `fn` is a diagonal Normal with one event dimension (what :func:`free_bits_kl_sum` needs)."""
    return normal_parameters(fn) is not None


def _unbroadcast(tensors: list, batch_dims: int) -> tuple[list, int]:
    """`tensors` (broadcast to one shape first) without the leading batch dimensions along which
    all of them are broadcast (stride 0; the last batch dimension is kept), and how many copies
    those dimensions held."""
    if any(t.shape != tensors[0].shape for t in tensors):
        tensors = torch.broadcast_tensors(*tensors)
    lead = 0
    while lead < batch_dims - 1 and all(t.stride(lead) == 0 for t in tensors):
        lead += 1
    index = (0,) * lead
    return [t[index] for t in tensors], math.prod(tensors[0].shape[:lead])


def diagonal_normal_kl(q_loc, q_scale, p_loc, p_scale) -> torch.Tensor:
    """KL(N(q_loc, q_scale^2) || N(p_loc, p_scale^2)) per dimension (no sum), by its closed form
    log(s_p / s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2, computed as
    1/2 (r^2 + ((m_q - m_p) / s_p)^2 - 1) - log r with r = s_q / s_p."""
    ratio = q_scale / p_scale
    return 0.5 * (ratio.square() + ((q_loc - p_loc) / p_scale).square() - 1) - ratio.log()


def diagonal_normal_kl_sum(q_loc, q_scale, p_loc, p_scale) -> torch.Tensor:
    """The sum of :func:`diagonal_normal_kl` over all N elements, as a 0-d tensor:

        1/2 (sum r^2 + sum ((m_q - m_p) / s_p)^2 - N) - sum log r,  r = s_q / s_p

    with the two sums of squares as dot products (the term record's KL: fewer passes over the
    elements than the per-dimension form and its sum). The four tensors have one shape."""
    ratio = q_scale / p_scale
    gap = (q_loc - p_loc).div_(p_scale).reshape(-1)
    flat = ratio.reshape(-1)
    return 0.5 * (torch.dot(flat, flat) + torch.dot(gap, gap) - flat.numel()) - flat.log().sum()


def free_bits_kl_sum(q, p, free_bits: float = 0.0, prior_only: bool = False) -> torch.Tensor:
    """The KL term of a batch as the remedies count it, for two diagonal Normals q and p with
    KL_{b,d} their closed-form KL per record b and dimension d:

        B * sum_d max(free_bits, 1/B sum_b KL_{b,d})

    (free bits, Kingma et al. 2016, Sec. C.8: the batch-mean KL of each dimension counts only above
    lambda = free_bits nats; with free_bits = 0 this is sum_b sum_d KL_{b,d}, the plain KL), summed
    over any leading (particle) dimension. With `prior_only` q's loc and scale are detached: the
    term's gradient moves p alone. ValueError unless both are diagonal Normals.
    """
    qp, pp = normal_parameters(q), normal_parameters(p)
    if qp is None or pp is None:
        raise ValueError("free bits and kl_gradient=prior need a diagonal Normal prior and guide")
    q_loc, q_scale = (t.detach() for t in qp) if prior_only else qp
    kl = diagonal_normal_kl(q_loc, q_scale, *pp)  # (..., B, D)
    batch = kl.shape[-2]
    return (batch * kl.mean(-2).clamp(min=free_bits).sum(-1)).sum()


def explicit_kl_sum(sites: tuple[Sequence, Sequence], num_particles: int, kl: KLSum) -> torch.Tensor:
    """An objective's explicit KL term for a batch: `kl(q, p)` at site "z" of each (model run,
    guide run) pair, summed, divided by the L particles (a vectorised run holds all L along a
    leading dimension; otherwise there are L runs). ValueError when site "z" is missing."""
    total = None
    for model_sites, guide_sites in zip(*sites):
        if "z" not in model_sites.nodes or "z" not in guide_sites.nodes:
            raise ValueError('an explicit KL term needs a latent site "z" in model and guide')
        term = kl(guide_sites.nodes["z"]["fn"], model_sites.nodes["z"]["fn"])
        total = term if total is None else total + term
    return total / num_particles
