"""Objective `no_mi`: Eq. 8 without L_MI (the paper's Table 2 ablation "w/o L_MI", Eq. 7)."""

from __future__ import annotations

from vkd_pyro.inference.terms import IMAGE_NLL, KL, LOSS
from vkd_pyro.objectives.vkd import VKD


class NoMI(VKD):
    """Eq. 8 without the MI head: the image likelihood and beta * KL(q(z_T|x_T) || p(z_I|x_I)).

    No teacher q(y|z_T); at beta = 0 the guide gets no gradient (DDP must allow for it)."""

    name = "no_mi"
    title = "VKD without L_MI"
    terms = (LOSS, IMAGE_NLL, KL)
    has_teacher = False
    mutual_information = False
    unused_parameters = True
