"""Objective `image_only`: the image classifier alone (the paper's Table 2 ablation "w/o VKD")."""

from __future__ import annotations

from vkd_pyro.classes import NUM_CLASSES
from vkd_pyro.guides import NoGuide
from vkd_pyro.models import VKDModel
from vkd_pyro.objectives.base import Objective, Parts


class ImageOnly(Objective):
    """1/M sum_m log p(y | x_I, z_I^(m)), z_I^(m) ~ p(z_I|x_I): the model without a latent site
    while training (no log p(z) without a guide) and no guide; the reports are not read."""

    name = "image_only"
    title = "without VKD (image only)"

    def programs(self, parts: Parts):
        image_encoder = parts.image_encoder()
        prior_net = parts.family("prior", image_encoder.out_features)
        model = VKDModel(image_encoder, NUM_CLASSES, z_dim=self.config.model.z_dim,
                         prior_samples=self.inference.prior_samples, latent_from_guide=False,
                         mutual_information=False, prior_net=prior_net)
        return model, NoGuide()
