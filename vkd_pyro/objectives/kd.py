"""Objective `kd`: knowledge distillation (Hinton et al. 2015) from a `text_only` teacher run.

    (1 - alpha) BCE(y, p_student) + alpha T^2 BCE(p_teacher^T, p_student^T)

per record, averaged over M prior draws of the image model (`vkd_pyro.models.DistilledModel`); no
guide. The teacher's tempered probabilities of the training records are computed once before
training (`vkd_pyro.training.distillation`, from the run `inference.kd.teacher` names); at test time it
is Algorithm 2, images alone.
"""

from __future__ import annotations

from vkd_pyro.classes import NUM_CLASSES
from vkd_pyro.errors import ConfigError
from vkd_pyro.guides import NoGuide
from vkd_pyro.models import DistilledModel
from vkd_pyro.objectives.base import Objective, Parts


class KD(Objective):
    """Distillation from the soft targets of a report teacher into the image classifier."""

    name = "kd"
    reads_reports = True  # the teacher reads the training reports
    test_elbo = False  # its likelihood needs the teacher's soft labels, which exist for the training split only
    distils = True

    def check(self) -> None:
        super().check()
        if not self.inference.kd.teacher:
            raise ConfigError("inference.kd.teacher: objective kd needs a finished text_only run folder as its teacher")

    def programs(self, parts: Parts):
        image_encoder = parts.image_encoder()
        prior_net = parts.family("prior", image_encoder.out_features)
        kd = self.inference.kd
        model = DistilledModel(image_encoder, NUM_CLASSES, z_dim=self.config.model.z_dim,
                               prior_samples=self.inference.prior_samples, prior_net=prior_net,
                               alpha=kd.alpha, temperature=kd.temperature)
        return model, NoGuide()
