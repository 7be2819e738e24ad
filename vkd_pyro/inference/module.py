"""The probabilistic module: a Pyro model, its guide and the ELBO, as one `nn.Module`.

The one place that maps a batch to the model's and guide's arguments (:meth:`VKDModule.batch_args`),
the training loss (:meth:`VKDModule.forward`, minus Eq. 8 per example, or minus the objective of
`text_only` / `kd`), Algorithm 2 through `pyro.infer.Predictive` (:meth:`VKDModule.predict`) and the
teacher q(y|z_T) on reports (:meth:`VKDModule.teacher_logits`). The training loop lives in
`vkd_pyro.training.loop`; this module depends on torch and Pyro only.

Remedies for posterior collapse (both off by default: then the loss is Pyro's ELBO as it is). With
either on, site "z" is masked out of the ELBO in model and guide (`kl_weighted(0)`: z is still drawn
by the guide and replayed, the MI term still sees it) and the KL term is added explicitly, from the
same traces, as beta * :func:`vkd_pyro.inference.elbo.remedied_kl_sum` (analytic, diagonal Normals):

- free_bits = lambda > 0 (Kingma et al. 2016, "Improved variational inference with inverse
  autoregressive flow", Sec. C.8): per latent dimension d, the batch-mean KL_d counts only above
  lambda: B sum_d max(lambda, 1/B sum_b KL_{b,d}).
- kl_gradient = "prior": q's loc and scale are detached inside the KL, so that the KL term moves
  only the prior toward the posterior; the MI term still trains the guide. A variant, not the
  paper's ELBO.

The recorded `kl` (ObjectiveTerms) stays the unclamped KL(q || p) either way.
"""

from __future__ import annotations

import torch
from pyro.infer import Predictive
from torch import nn

from vkd_pyro.inference.elbo import make_elbo, remedied_kl_sum, term_vector, terms_from_sums

KL_GRADIENTS = ("both", "prior")


class VKDModule(nn.Module):
    """model + guide + ELBO estimator (`elbo`: trace | meanfield, with L = num_particles), and the
    remedies `free_bits` (lambda, nats per dimension) and `kl_gradient` (both | prior)."""

    def __init__(self, model: nn.Module, guide: nn.Module, elbo: str = "trace", num_particles: int = 1,
                 free_bits: float = 0.0, kl_gradient: str = "both"):
        super().__init__()
        if free_bits < 0 or kl_gradient not in KL_GRADIENTS:
            raise ValueError(f"free_bits must be >= 0 and kl_gradient one of {KL_GRADIENTS}")
        self.model = model
        self.guide = guide
        self.elbo = make_elbo(elbo, num_particles)
        self.free_bits, self.kl_gradient = float(free_bits), kl_gradient
        # objective kd: the teacher's tempered probabilities, one row per dataset index (set_soft_targets)
        self.register_buffer("soft_targets", None, persistent=False)

    @property
    def explicit_kl(self) -> bool:
        """Whether the KL term is added explicitly (a remedy is on) instead of by the ELBO at site "z"."""
        return self.free_bits > 0 or self.kl_gradient == "prior"

    @property
    def has_teacher(self) -> bool:
        """Whether there is a teacher q(y|z_T): a guide with a posterior and a model with an MI head."""
        return hasattr(self.guide, "posterior") and getattr(self.model, "text_classifier", None) is not None

    def set_soft_targets(self, table: torch.Tensor) -> None:
        """Objective kd: the teacher's tempered probabilities (N, C), row i for dataset index i."""
        self.soft_targets = table.to(next(self.parameters()).device)

    def batch_args(self, batch, kl_weight: float = 1.0) -> tuple[tuple, dict]:
        """(args, kwargs) for model and guide from a `vkd_pyro.data.batching.Batch` (images, token_states,
        token_mask, labels, label_mask; with soft targets, the batch's rows of them as soft_labels):
        model and guide share one signature, each reads its part."""
        args = (batch.images, batch.token_states, batch.token_mask)
        kwargs = {"labels": batch.labels, "label_mask": batch.label_mask, "kl_weight": kl_weight}
        if self.soft_targets is not None:
            kwargs["soft_labels"] = self.soft_targets[batch.index.to(self.soft_targets.device)]
        return args, kwargs

    def forward(self, batch, kl_weight: float = 1.0, sync_terms: bool = True):
        """The differentiable loss, minus Eq. 8 averaged over the batch, and its terms.

        With sync_terms=False the terms are a detached (4,) tensor on the device (loss, image_nll,
        text_nll, kl: `objective.term_vector`), so that a training step reads nothing back to the host.
        """
        explicit = self.explicit_kl
        args, kwargs = self.batch_args(batch, 0.0 if explicit else kl_weight)
        loss = self.elbo.differentiable_loss(self.model, self.guide, *args, **kwargs)
        if explicit and kl_weight > 0:
            loss = loss + kl_weight * remedied_kl_sum(self.elbo.traces, self.elbo.num_particles, self.free_bits,
                                                      prior_only=self.kl_gradient == "prior")
        loss = loss / batch.size
        if not sync_terms:
            return loss, term_vector(loss * batch.size, self.elbo.sums, batch.size)
        return loss, terms_from_sums(loss * batch.size, self.elbo.sums, batch.size, kl_weight)

    @torch.no_grad()
    def teacher_logits(self, token_states: torch.Tensor, token_mask: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Logits of the teacher q(y | z_T^(s)) for S draws z_T^(s) ~ q(z_T | x_T), shape (S, B, C).

        Reports alone (the image is not used). Call `eval()` first to switch dropout off.
        """
        if not self.has_teacher:
            raise ValueError("this module has no teacher q(y|z_T) (it needs a guide and an MI head)")
        posterior = self.guide.posterior(token_states, token_mask)
        return self.model.text_classifier(posterior.sample((num_samples,)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Algorithm 2: p(y=1 | x_I, z_I^(s)) for S prior samples z_I^(s), shape (S, B, C).

        Images alone: the guide is not used. Call `eval()` first to switch dropout off.
        """
        if not hasattr(self.model, "program"):
            raise ValueError("this module predicts from reports only (objective text_only): use teacher_logits")
        features = self.model.image_encoder(images)
        predictive = Predictive(self.model.program, num_samples=num_samples, return_sites=("probs",),
                                parallel=True)
        return predictive(features)["probs"].reshape(num_samples, images.shape[0], -1)
