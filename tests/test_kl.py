"""vkd_pyro.inference.kl: the recorded KL(q || p) against torch's own closed form."""

import pytest
import torch
from pyro.distributions import Normal
from torch.distributions import kl_divergence

from vkd_pyro.inference.kl import diagonal_normal_kl, diagonal_normal_kl_sum, kl_sum


def normals(shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g), torch.rand(shape, generator=g) + 0.2,
            torch.randn(shape, generator=g), torch.rand(shape, generator=g) + 0.2)


def test_the_sum_form_is_torch_kl_summed():
    q_loc, q_scale, p_loc, p_scale = normals()
    expected = kl_divergence(torch.distributions.Normal(q_loc, q_scale), torch.distributions.Normal(p_loc, p_scale))
    assert diagonal_normal_kl(q_loc, q_scale, p_loc, p_scale) == pytest.approx(expected, rel=1e-5)
    assert diagonal_normal_kl_sum(q_loc, q_scale, p_loc, p_scale).item() == pytest.approx(expected.sum().item(), rel=1e-5)


def test_the_sum_form_has_the_per_dimension_forms_gradient():
    tensors = [t.requires_grad_() for t in normals()]
    diagonal_normal_kl_sum(*tensors).backward()
    grads = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    diagonal_normal_kl(*tensors).sum().backward()
    for got, want in zip(grads, (t.grad for t in tensors)):
        assert torch.allclose(got, want, atol=1e-6)


def test_kl_sum_counts_broadcast_particles_once_each():
    """Under L vectorised particles the sites' Normals are (L, B)-expansions of (B, D) ones: the record
    is L times the KL of the (B, D) pair, as torch's KL of the expanded pair gives it."""
    q_loc, q_scale, p_loc, p_scale = normals()
    L = 4
    q = Normal(q_loc, q_scale).to_event(1).expand((L, 6))
    p = Normal(p_loc, p_scale).to_event(1).expand((L, 6))
    expected = kl_divergence(q, p).sum().item()
    assert kl_sum({"fn": q}, {"fn": p}).item() == pytest.approx(expected, rel=1e-5)
    assert kl_sum({"fn": q}, {"fn": p}).item() == pytest.approx(L * diagonal_normal_kl(*normals()).sum().item(), rel=1e-5)
