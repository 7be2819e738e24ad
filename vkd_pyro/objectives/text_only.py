"""Objective `text_only`: the report branch alone, a variational information bottleneck (Alemi et al. 2017).

    E_{q(z_T|x_T)}[log q(y | z_T)] - beta KL(q(z_T|x_T) || N(0, I))

The model is `vkd_pyro.models.ReportBottleneck`, the guide the EHR posterior. There is no image
side: the run is evaluated, validated and used as a kd teacher through q(y|z_T) on the reports.
"""

from __future__ import annotations

from vkd_pyro.classes import NUM_CLASSES
from vkd_pyro.inference.terms import KL, LOSS, TEXT_NLL
from vkd_pyro.models import ReportBottleneck
from vkd_pyro.objectives.base import Objective, Parts


class TextOnly(Objective):
    """The report branch alone (VIB): the teacher's ceiling, and the kd objective's teacher."""

    name = "text_only"
    terms = (LOSS, TEXT_NLL, KL)
    has_guide = True
    has_teacher = True
    reads_reports = True
    predicts_from = "reports"

    def programs(self, parts: Parts):
        return ReportBottleneck(NUM_CLASSES, z_dim=self.config.model.z_dim), self.report_guide(parts, None, None)
