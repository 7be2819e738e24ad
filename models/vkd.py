"""The VKD model: conditional prior p(z_I|x_I), classifier p(y|x_I, z_I) and the MI head q(y|z_T).

Read together with `guides/ehr_posterior.py`. Under `Trace_ELBO` the pair gives minus Eq. 8 of the
paper (summed over the batch instead of averaged; :class:`vkd_pyro.inference.module.VKDModule` divides by it):

    loss = - sum_n [ 1/M sum_m log p(y_n | x_I, z_I^(m))          site "image_log_lik"
                     + 1/L sum_l log q(y_n | z_T^(l))              site "text_labels"   (L_MI)
                     - beta * KL(q(z_T|x_T^n) || p(z_I|x_I^n)) ]   site "z", scaled by beta

with z_I^(m) ~ p(z_I|x_I) drawn here (hidden from the trace: it is not a latent site of the model),
by reparameterisation where the prior has it (`vkd_pyro.models.prior_draws` otherwise), and
z_T^(l) ~ q(z_T|x_T) drawn by the guide and replayed at site "z".
At test time (`labels=None`) site "z" is sampled from the prior and "probs" records p(y=1|x_I, z_I):
Algorithm 2, images alone.
"""

from __future__ import annotations

from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

from vkd_pyro.models.families import DiagonalNormal
from vkd_pyro.models.prior_draws import draw, monte_carlo_mean


def kl_weighted(beta: float):
    """The handler that weights site "z" by beta in model and guide: beta * (log p - log q).

    `poutine.scale` for beta > 0; at beta = 0 (the start of each cycle of Eq. 9), where Pyro's
    scale refuses 0, `poutine.mask(mask=False)`: the site still draws z (and the MI term still sees
    it) but contributes nothing to the ELBO, which is exactly the weight 0.
    """
    if beta < 0:
        raise ValueError(f"the KL weight must be >= 0, got {beta}")
    return poutine.scale(scale=beta) if beta > 0 else poutine.mask(mask=False)


class VKDModel(nn.Module):
    """p(z_I|x_I) p(y|x_I, z_I), with q(y|z_T) as an auxiliary likelihood (the MI bound, Eq. 6-7).

    latent_from_guide: site "z" is in the training trace and replayed from the guide (objectives
        `vkd`, `no_mi`). False for `image_only`: the model then has no latent site while training,
        so that the loss is the classification term alone (no log p(z) without a guide).
    mutual_information: add the observed site q(y|z_T) (objective `vkd`; off for `no_mi`).
    prior_net: the conditional prior, a module that maps image features (B, F) to p(z_I|x_I) (a family
        of `vkd_pyro.models.families` or any module with that interface); None: the paper's
        diagonal Normal from an MLP with `hidden` sizes and `dropout`.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        num_classes: int,
        z_dim: int = 512,
        hidden: Sequence[int] = (512, 512),
        dropout: float = 0.5,
        prior_samples: int = 1,
        latent_from_guide: bool = True,
        mutual_information: bool = True,
        prior_net: Optional[nn.Module] = None,
    ):
        super().__init__()
        if mutual_information and not latent_from_guide:
            raise ValueError("the MI term scores the guide's z: it needs latent_from_guide")
        self.image_encoder = image_encoder
        features = image_encoder.out_features
        self.prior_net = DiagonalNormal(features, z_dim, hidden, dropout) if prior_net is None else prior_net
        self.classifier = nn.Linear(z_dim + features, num_classes)  # p(y | x_I, z_I)
        self.text_classifier = nn.Linear(z_dim, num_classes) if mutual_information else None  # q(y | z_T)
        self.prior_samples = prior_samples
        self.latent_from_guide = latent_from_guide

    def prior(self, features: torch.Tensor) -> dist.Distribution:
        """p(z_I | x_I), batch shape (B,), event shape (z_dim,)."""
        return self.prior_net(features)

    def class_logits(self, z: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Logits of p(y|x_I, z_I) for z of shape (..., B, z_dim) and features (B, F)."""
        features = features.expand(z.shape[:-1] + features.shape[-1:])
        return self.classifier(torch.cat([z, features], dim=-1))

    def forward(
        self,
        images: torch.Tensor,
        token_states: Optional[torch.Tensor] = None,
        token_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        label_mask: Optional[torch.Tensor] = None,
        beta: float = 1.0,
        soft_labels: Optional[torch.Tensor] = None,
    ):
        """The model. It reads the image only; the report arguments are the guide's."""
        return self.program(self.image_encoder(images), labels, label_mask, beta, soft_labels)

    def program(
        self,
        features: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        label_mask: Optional[torch.Tensor] = None,
        beta: float = 1.0,
        soft_labels: Optional[torch.Tensor] = None,
    ) -> None:
        """The probabilistic program on image features x_I (B, F). label_mask (B, C) drops labels;
        soft_labels (B, C) are a teacher's tempered probabilities (objective `kd`, :class:`DistilledModel`)."""
        prior = self.prior(features)
        with pyro.plate("data", features.shape[0]):
            if labels is None:  # Algorithm 2: z_I from the prior, then p(y | x_I, z_I)
                z = pyro.sample("z", prior)
                pyro.deterministic("probs", torch.sigmoid(self.class_logits(z, features)), event_dim=1)
                return
            if self.latent_from_guide:
                with kl_weighted(beta):
                    z_text = pyro.sample("z", prior)  # z_T ~ q(z_T|x_T), replayed from the guide
            # Eq. 8, first term: the mean over M prior draws z_I^(m) of log p(y | x_I, z_I^(m)).
            z_image, score = draw(prior, self.prior_samples)  # score: None when fully reparameterised
            log_lik = self.image_log_lik(self.class_logits(z_image, features), labels, label_mask, soft_labels)
            pyro.factor("image_log_lik", monte_carlo_mean(log_lik, score))
            if self.text_classifier is not None:  # L_MI: log q(y | z_T) at the guide's sample
                likelihood = dist.Bernoulli(logits=self.text_classifier(z_text))
                if label_mask is not None:
                    likelihood = likelihood.mask(label_mask)
                pyro.sample("text_labels", likelihood.to_event(1), obs=labels)

    def image_log_lik(self, logits: torch.Tensor, labels: torch.Tensor, label_mask: Optional[torch.Tensor],
                      soft_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The image term per draw, (..., B): log p(y | x_I, z_I) = sum_c log Bernoulli(y_c | sigmoid(logit_c))."""
        return bernoulli_log_lik(logits, labels, label_mask)


class DistilledModel(VKDModel):
    """Objective `kd`: plain knowledge distillation (Hinton et al. 2015, "Distilling the knowledge in a
    neural network") from a report teacher into the image classifier, as a Pyro model without a guide.

    The image term of :class:`VKDModel` (no latent site, no MI head: `image_only`'s program) becomes, per
    prior draw z_I and averaged over the M draws as there,

        (1 - alpha) sum_c log Bernoulli(y_c | s_c) + alpha T^2 sum_c [q_c log s_c^T + (1 - q_c) log(1 - s_c^T)]

    with s_c = sigmoid(l_c) the student's probability from its logit l_c = logit of p(y_c|x_I, z_I),
    s_c^T = sigmoid(l_c / T), and q_c = sigmoid(logit(p_teacher,c) / T) the teacher's probability at the
    same temperature (`soft_labels`, computed once for the training split). So the loss is
    (1 - alpha) BCE(y, p_student) + alpha T^2 BCE(p_teacher^T, p_student^T) per record, summed over the
    classes label_mask keeps; T^2 keeps the soft term's gradients on the scale of the hard one's.
    Training records this as the image NLL. At test time it is Algorithm 2 (images alone), as image_only.
    """

    def __init__(self, *args, alpha: float = 0.5, temperature: float = 2.0, **kwargs):
        super().__init__(*args, latent_from_guide=False, mutual_information=False, **kwargs)
        if not 0.0 <= alpha <= 1.0 or temperature <= 0:
            raise ValueError(f"kd needs alpha in [0, 1] and a temperature > 0, got {alpha} and {temperature}")
        self.alpha, self.temperature = alpha, temperature

    def image_log_lik(self, logits, labels, label_mask, soft_labels=None):
        if soft_labels is None:
            raise ValueError("objective kd: the model needs the teacher's soft labels of the batch")
        T = self.temperature
        hard = bernoulli_log_lik(logits, labels, label_mask)
        soft = bernoulli_log_lik(logits / T, soft_labels, label_mask)
        return (1 - self.alpha) * hard + self.alpha * T**2 * soft


def tempered(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """sigmoid(logit(p) / T): probabilities at temperature T (p clamped into [1e-6, 1 - 1e-6] first)."""
    return torch.sigmoid(torch.logit(probs, eps=1e-6) / temperature)


def bernoulli_log_lik(logits: torch.Tensor, labels: torch.Tensor,
                      label_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_c log Bernoulli(y_c | sigmoid(logit_c)) = -sum_c BCE(logit_c, y_c) over the last dim (the
    classes label_mask keeps); logits (..., B, C) broadcast against labels (B, C)."""
    log_prob = -F.binary_cross_entropy_with_logits(logits, labels.expand(logits.shape), reduction="none")
    if label_mask is not None:
        log_prob = log_prob * label_mask
    return log_prob.sum(-1)
