"""The probabilistic module: a Pyro model, its guide and the ELBO, as one `nn.Module`.

The one place that maps a batch to the model's and guide's arguments (:meth:`VKDModule.batch_args`),
the training loss (:meth:`VKDModule.forward`, minus Eq. 8 per example) and Algorithm 2 through
`pyro.infer.Predictive` (:meth:`VKDModule.predict`). The training loop lives in `vkd_pyro.training.loop`; this module
depends on torch and Pyro only.
"""

from __future__ import annotations

import torch
from pyro.infer import Predictive
from torch import nn

from vkd_pyro.inference.elbo import make_elbo, term_vector, terms_from_sums


class VKDModule(nn.Module):
    """model + guide + ELBO estimator (`elbo`: trace | meanfield, with L = num_particles)."""

    def __init__(self, model: nn.Module, guide: nn.Module, elbo: str = "trace", num_particles: int = 1):
        super().__init__()
        self.model = model
        self.guide = guide
        self.elbo = make_elbo(elbo, num_particles)

    @staticmethod
    def batch_args(batch, kl_weight: float = 1.0) -> tuple[tuple, dict]:
        """(args, kwargs) for model and guide from a `vkd_pyro.data.batching.Batch` (images, token_states,
        token_mask, labels, label_mask): model and guide share one signature, each reads its part."""
        args = (batch.images, batch.token_states, batch.token_mask)
        kwargs = {"labels": batch.labels, "label_mask": batch.label_mask, "kl_weight": kl_weight}
        return args, kwargs

    def forward(self, batch, kl_weight: float = 1.0, sync_terms: bool = True):
        """The differentiable loss, minus Eq. 8 averaged over the batch, and its terms.

        With sync_terms=False the terms are a detached (4,) tensor on the device (loss, image_nll,
        text_nll, kl: `objective.term_vector`), so that a training step reads nothing back to the host.
        """
        args, kwargs = self.batch_args(batch, kl_weight)
        loss = self.elbo.differentiable_loss(self.model, self.guide, *args, **kwargs) / batch.size
        if not sync_terms:
            return loss, term_vector(loss * batch.size, self.elbo.sums, batch.size)
        return loss, terms_from_sums(loss * batch.size, self.elbo.sums, batch.size, kl_weight)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Algorithm 2: p(y=1 | x_I, z_I^(s)) for S prior samples z_I^(s), shape (S, B, C).

        Images alone: the guide is not used. Call `eval()` first to switch dropout off.
        """
        features = self.model.image_encoder(images)
        predictive = Predictive(self.model.program, num_samples=num_samples, return_sites=("probs",),
                                parallel=True)
        return predictive(features)["probs"].reshape(num_samples, images.shape[0], -1)
