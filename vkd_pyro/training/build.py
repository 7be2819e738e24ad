"""Build the probabilistic module a config describes: its objective's programs, terms and KL term, its
ELBO, and the speed options (bf16, channels-last)."""

from __future__ import annotations

from typing import Optional

import pyro

from vkd_pyro.config import Config
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.objectives import Objective, Parts, objective_for
from vkd_pyro.objectives.resolve import check_family
from vkd_pyro.training.accel import apply_speed_options
from vkd_pyro.training.finetune import init_from_run


def check_config(config: Config) -> Objective:
    """The config's objective, after the checks that need no data: the families (`model.prior`,
    `model.guide`: they import and take the options given) and the objective's own
    (:meth:`Objective.check`). ConfigError, one line naming the key, otherwise."""
    check_family("prior", config.model.prior, config.model.prior_options)
    check_family("guide", config.model.guide, config.model.guide_options)
    objective = objective_for(config)
    objective.check()
    return objective


def build_module(config: Config, dims: Optional[dict] = None) -> VKDModule:
    """The module of `config`: the objective's model and guide (`Objective.programs`), the terms it
    records and its explicit KL term, with `inference.elbo` and L particles. `dims`
    (`vkd_pyro.data.prepare.text_dims`) are needed when the objective has a guide."""
    objective = objective_for(config)
    model, guide = objective.programs(Parts(config, dims))
    module = VKDModule(model, guide, elbo=config.inference.elbo, num_particles=config.inference.num_particles,
                       terms=objective.terms, kl=objective.kl())
    return apply_speed_options(module, config.train.amp, config.image_encoder.channels_last)  # vkd_pyro.training.accel


def initial_module(config: Config, dims: Optional[dict] = None,
                   fine_tune: bool = True) -> tuple[VKDModule, Optional[str]]:
    """(module, message) as a run starts: Pyro's and torch's generators seeded by `seed` (the same
    initial weights whatever drew before), the module built, and with `fine_tune` and `init_from`
    the matching model.* weights of that run loaded (`message` says which; None otherwise)."""
    pyro.set_rng_seed(config.seed)
    module = build_module(config, dims)
    message = init_from_run(module, config.init_from)["message"] if fine_tune and config.init_from else None
    return module, message
