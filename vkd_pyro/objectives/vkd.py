"""Objective `vkd`: Eq. 8 of the paper (van Sonsbeek et al., IPMI 2021), the default.

    E_{q(z_T|x_T)}[ 1/M sum_m log p(y | x_I, z_I^(m)) + log q(y | z_T) ] - beta KL(q(z_T|x_T) || p(z_I|x_I))

The model is `vkd_pyro.models.VKDModel` (the conditional prior p(z_I|x_I), the classifier
p(y|x_I, z_I) and the MI head q(y|z_T) as an auxiliary likelihood), the guide the EHR posterior
q(z_T|x_T) of `guides/ehr_posterior.py`; Trace_ELBO of the pair is minus Eq. 8 (`models/vkd.py`
writes out which site gives which term).
"""

from __future__ import annotations

from vkd_pyro.classes import NUM_CLASSES
from vkd_pyro.inference.terms import EQ8_TERMS
from vkd_pyro.models import VKDModel
from vkd_pyro.objectives.base import Objective, Parts


class VKD(Objective):
    """Eq. 8: image likelihood, L_MI through q(y|z_T), and beta * KL(q(z_T|x_T) || p(z_I|x_I))."""

    name = "vkd"
    title = "with VKD"
    terms = EQ8_TERMS
    has_guide = True
    has_teacher = True
    reads_reports = True
    mutual_information = True  # the MI head q(y|z_T) and its term L_MI

    def programs(self, parts: Parts):
        image_encoder = parts.image_encoder()
        features = image_encoder.out_features
        prior_net = parts.family("prior", features)
        model = VKDModel(image_encoder, NUM_CLASSES, z_dim=self.config.model.z_dim,
                         prior_samples=self.inference.prior_samples, latent_from_guide=True,
                         mutual_information=self.mutual_information, prior_net=prior_net)
        return model, self.report_guide(parts, prior_net, features)
