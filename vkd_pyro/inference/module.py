"""The probabilistic module: a Pyro model, its guide and the ELBO, as one `nn.Module`.

The one place that maps a batch to the model's and guide's arguments (:meth:`VKDModule.batch_args`),
the training loss (:meth:`VKDModule.forward`: minus the objective per example, and its recorded
terms), Algorithm 2 through `pyro.infer.Predictive` (:meth:`VKDModule.predict`) and the teacher
q(y|z_T) on reports (:meth:`VKDModule.teacher_logits`). Which model, guide, terms and KL term make
up a module is the objective's choice (`vkd_pyro.objectives`); the training loop lives in
`vkd_pyro.training.loop`; this module depends on torch and Pyro only.

An explicit KL term (`kl`: an objective's own, e.g. the remedies for posterior collapse of
`vkd_pyro.inference.kl.free_bits_kl_sum`, or a KL in the other direction): site "z" is then masked
out of the ELBO in model and guide (`kl_weighted(0)`: z is still drawn by the guide and replayed,
the MI term still sees it) and beta * `kl(q, p)` is added from the same runs
(`vkd_pyro.inference.kl.explicit_kl_sum`). Without it the loss is Pyro's ELBO as it is. The
recorded terms are read off the same runs either way (so the recorded `kl` stays KL(q || p)).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from pyro.infer import Predictive
from torch import nn

from vkd_pyro.inference.elbo import RecordedELBO, read_terms
from vkd_pyro.inference.kl import KLSum, explicit_kl_sum
from vkd_pyro.inference.terms import EQ8_TERMS, Term


class VKDModule(nn.Module):
    """model + guide + ELBO estimator (`elbo`: trace | meanfield, with L = num_particles), the
    terms it records (`terms`, `vkd_pyro.inference.terms`) and an optional explicit KL term `kl`."""

    def __init__(self, model: nn.Module, guide: nn.Module, elbo: str = "trace", num_particles: int = 1,
                 terms: Sequence[Term] = EQ8_TERMS, kl: Optional[KLSum] = None, vectorize_particles: bool = True):
        super().__init__()
        self.model = model
        self.guide = guide
        self.elbo = RecordedELBO(elbo, num_particles, vectorize_particles)
        self.terms = tuple(terms)
        self.kl = kl
        # objective kd: the teacher's tempered probabilities, one row per dataset index (set_soft_targets)
        self.register_buffer("soft_targets", None, persistent=False)

    def set_soft_targets(self, table: torch.Tensor) -> None:
        """Objective kd: the teacher's tempered probabilities (N, C), row i for dataset index i."""
        self.soft_targets = table.to(next(self.parameters()).device)

    def batch_args(self, batch, beta: float = 1.0) -> tuple[tuple, dict]:
        """(args, kwargs) for model and guide from a `vkd_pyro.data.batching.Batch` (images, token_states,
        token_mask, labels, label_mask; with soft targets, the batch's rows of them as soft_labels):
        model and guide share one signature, each reads its part."""
        args = (batch.images, batch.token_states, batch.token_mask)
        kwargs = {"labels": batch.labels, "label_mask": batch.label_mask, "beta": beta}
        if self.soft_targets is not None:
            kwargs["soft_labels"] = self.soft_targets[batch.index.to(self.soft_targets.device)]
        return args, kwargs

    def forward(self, batch, beta: float = 1.0, sync_terms: bool = True):
        """The differentiable loss, minus the objective averaged over the batch, and its terms.

        With sync_terms=False the terms are a detached (len(terms),) tensor on the device, in the
        order of `terms` (`RecordedELBO.term_vector`), so that a training step reads nothing back
        to the host; otherwise :class:`~vkd_pyro.inference.terms.StepTerms` of Python floats.
        """
        explicit = self.kl is not None
        args, kwargs = self.batch_args(batch, 0.0 if explicit else beta)
        loss, sites = self.elbo.loss_and_sites(self.model, self.guide, *args, **kwargs)
        if explicit and beta > 0:
            loss = loss + beta * explicit_kl_sum(sites, self.elbo.num_particles, self.kl)
        vector = self.elbo.term_vector(self.terms, loss, sites, batch.size)
        loss = loss / batch.size
        return (loss, vector) if not sync_terms else (loss, read_terms(self.terms, vector, beta))

    @torch.no_grad()
    def teacher_logits(self, token_states: torch.Tensor, token_mask: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Logits of the teacher q(y | z_T^(s)) for S draws z_T^(s) ~ q(z_T | x_T), shape (S, B, C).

        Reports alone (the image is not used). Call `eval()` first to switch dropout off.
        """
        if not hasattr(self.guide, "posterior") or getattr(self.model, "text_classifier", None) is None:
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
