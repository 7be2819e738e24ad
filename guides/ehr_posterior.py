"""The guide: the EHR posterior q(z_T | x_T), a distribution from a network on report features.

It reads the report only: the frozen encoder's token states go through the one trainable
Transformer block and pooling (`text_head`), then the posterior network (`posterior_net`, a family
of `vkd_pyro.models.families`; the paper's diagonal Gaussian by default) gives q(z_T | x_T). Site "z" is
scaled by the KL weight beta exactly as in the model, so that the ELBO's z term is
beta * (log p - log q).
"""

from __future__ import annotations

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from vkd_pyro.models.families import DiagonalNormal
from vkd_pyro.models.vkd import kl_weighted


class EHRPosterior(nn.Module):
    """q(z_T | x_T) = posterior_net(text_head(x_T)).

    posterior_net: maps the pooled report features (B, H) to q(z_T | x_T) (`vkd_pyro.models.families`);
    None: the paper's N(loc(x_T), diag scale(x_T)^2) from an MLP with `hidden` sizes and `dropout`.
    """

    def __init__(self, text_head: nn.Module, z_dim: int = 512, hidden: Sequence[int] = (512, 512),
                 dropout: float = 0.5, posterior_net: Optional[nn.Module] = None):
        super().__init__()
        self.text_head = text_head
        self.posterior_net = (DiagonalNormal(text_head.out_features, z_dim, hidden, dropout)
                              if posterior_net is None else posterior_net)

    def posterior(self, token_states: torch.Tensor, token_mask: torch.Tensor) -> dist.Distribution:
        """q(z_T | x_T) for a padded batch of frozen token states (B, T, H) and their mask (B, T)."""
        return self.posterior_net(self.text_head(token_states, token_mask))

    def forward(
        self,
        images: torch.Tensor,
        token_states: Optional[torch.Tensor] = None,
        token_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        label_mask: Optional[torch.Tensor] = None,
        beta: float = 1.0,
    ) -> None:
        posterior = self.posterior(token_states, token_mask)
        with pyro.plate("data", token_states.shape[0]):
            with kl_weighted(beta):
                pyro.sample("z", posterior)


class NoGuide(nn.Module):
    """The guide of objective `image_only`: the model then has no latent site to guide."""

    def forward(self, *args, **kwargs) -> None:
        return None
