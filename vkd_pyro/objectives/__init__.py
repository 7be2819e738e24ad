"""Objectives: what a run optimises, one class a file, registered by name like the families.

`inference.objective` names one of `OBJECTIVES` or a class by its import path
`package.module:Name` (a subclass of :class:`Objective`, e.g. in a file beside the config);
:func:`objective_for` gives the objective of a config. Why a package of its own, above the
probabilistic core (`models/`, `guides/`, `vkd_pyro.inference`) and below training: an objective
reads the config and builds the encoders and families it needs, which the core (torch and Pyro
only) must not, and the trainer, the evaluator, the API and the sweep all ask it what a run has.
"""

from __future__ import annotations

import inspect

from vkd_pyro.config import Config
from vkd_pyro.errors import ConfigError
from vkd_pyro.inference.terms import EQ8_TERMS, IMAGE_NLL, KL, LOSS, TEXT_NLL, Term, site_nll
from vkd_pyro.objectives.base import Objective, Parts
from vkd_pyro.objectives.image_only import ImageOnly
from vkd_pyro.objectives.kd import KD
from vkd_pyro.objectives.no_mi import NoMI
from vkd_pyro.objectives.resolve import import_object
from vkd_pyro.objectives.text_only import TextOnly
from vkd_pyro.objectives.vkd import VKD

OBJECTIVES = {cls.name: cls for cls in (VKD, NoMI, ImageOnly, TextOnly, KD)}
KEY = "inference.objective"


def resolve_objective(spec: str) -> type[Objective]:
    """The Objective class `spec` names: a registered name or an import path package.module:Name.
    ConfigError naming inference.objective, one line, otherwise."""
    if ":" not in spec:
        if spec not in OBJECTIVES:
            raise ConfigError(f"{KEY}: unknown objective {spec!r} (registered: {', '.join(OBJECTIVES)}; "
                              "or an import path package.module:Name)")
        return OBJECTIVES[spec]
    found = import_object(spec, KEY)
    if not (inspect.isclass(found) and issubclass(found, Objective)):
        raise ConfigError(f"{KEY}: {spec!r} is not a subclass of vkd_pyro.objectives.Objective")
    return found


def objective_for(config: Config) -> Objective:
    """The objective of `config` (`inference.objective`), bound to it."""
    objective = resolve_objective(config.inference.objective)(config)
    objective.name = config.inference.objective  # a subclass by import path is known by its path
    return objective


__all__ = ["Objective", "Parts", "OBJECTIVES", "VKD", "NoMI", "ImageOnly", "TextOnly", "KD", "Term", "LOSS",
           "IMAGE_NLL", "TEXT_NLL", "KL", "EQ8_TERMS", "site_nll", "resolve_objective", "objective_for"]
