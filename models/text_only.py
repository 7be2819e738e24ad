"""Objective `text_only`: the report branch alone, as a variational information bottleneck.

Alemi et al. 2017 ("Deep variational information bottleneck", the paper's ref. 1): maximise

    E_{q(z_T|x_T)}[log q(y | z_T)] - beta KL(q(z_T|x_T) || N(0, I))

with the EHR posterior of `guides/ehr_posterior.py` as the encoder and the MI head q(y|z_T) as the
decoder. As a Pyro program: the model draws z ~ N(0, I) at site "z" (scaled by beta as in
`VKDModel`, replayed from the guide) and observes the labels at site "text_labels" through
q(y|z); under `Trace_ELBO` the loss is minus the objective above, summed over the batch. There is
no image side: the run is evaluated on the reports (`vkd_pyro.training.evaluate.teacher_split`).
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from vkd_pyro.models.distributions import BroadcastNormal
from vkd_pyro.models.vkd import kl_weighted


class ReportBottleneck(nn.Module):
    """p(z) = N(0, I) and the likelihood q(y | z_T) = prod_c Bernoulli(y_c | sigmoid(W z_T + b)_c)."""

    def __init__(self, num_classes: int, z_dim: int = 512):
        super().__init__()
        self.z_dim = z_dim
        self.text_classifier = nn.Linear(z_dim, num_classes)  # q(y | z_T), the MI head's name in VKDModel

    def prior(self, batch_size: int, like: torch.Tensor) -> dist.Distribution:
        """N(0, I), batch shape (batch_size,), event shape (z_dim,), on `like`'s device, in the classifier's dtype."""
        zeros = like.new_zeros(batch_size, self.z_dim, dtype=self.text_classifier.weight.dtype)
        return BroadcastNormal(zeros, torch.ones_like(zeros)).to_event(1)

    def forward(
        self,
        images: torch.Tensor,
        token_states: Optional[torch.Tensor] = None,
        token_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        label_mask: Optional[torch.Tensor] = None,
        beta: float = 1.0,
    ) -> None:
        """The model; it reads the batch size and the labels only (the report is the guide's)."""
        if token_states is None:
            raise ValueError("objective text_only needs the reports (token states)")
        batch_size = token_states.shape[0]
        with pyro.plate("data", batch_size):
            with kl_weighted(beta):
                z_text = pyro.sample("z", self.prior(batch_size, token_states))
            if labels is not None:
                likelihood = dist.Bernoulli(logits=self.text_classifier(z_text))
                if label_mask is not None:
                    likelihood = likelihood.mask(label_mask)
                pyro.sample("text_labels", likelihood.to_event(1), obs=labels)
