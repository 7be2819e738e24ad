"""Config names -> classes: prior and guide families and objectives; option checks, construction, KL pairing.

The interface a family meets is `vkd_pyro.models.families.ConditionalFamily`. A config names a family
by a registered name (`model.prior: diagonal`, `model.guide: flow`; the registries are
`vkd_pyro.models.PRIORS` and `vkd_pyro.guides.GUIDES`) or by an import path `package.module:Name`
(`model.guide: my_guides:TemperedNormalPosterior`; the current folder is searched too, so a module
beside the config works with the `vkd-pyro` command as with `python -m vkd_pyro`), with keyword
options in `model.prior_options` / `model.guide_options` (over the registry's defaults).

The KL term of Eq. 8 is analytic where `kl_divergence(q, p)` is registered (Pyro's, torch's and
`vkd_pyro.models.distributions`' pairs) and the Monte Carlo log q(z) - log p(z) at the guide's z
otherwise. An objective is named the same way (`inference.objective: vkd`, or
`inference.objective: my_objectives:ReversedKL`; the registry is `vkd_pyro.objectives.OBJECTIVES`),
resolved by :func:`resolve_objective`. A config read from a run folder (evaluate, predict, train
--resume, a kd teacher) imports a family or an objective by its path only when the user trusts that
run's code (:func:`check_trusted`, `--trust-code`).
The meanfield estimator promises an analytic KL, so it refuses a pairing without one
(:func:`require_analytic_kl`) rather than fall back silently on Monte Carlo.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Optional, Sequence

import torch
from pyro.distributions.kl import kl_divergence
from torch import nn
from torch.distributions import Distribution

from vkd_pyro.errors import ConfigError
from vkd_pyro.guides import GUIDES
from vkd_pyro.models import PRIORS

REGISTRIES = {"prior": PRIORS, "guide": GUIDES}
POSITIONAL = ("in_features", "z_dim", "hidden", "dropout")


def _import(module_name: str):
    """importlib.import_module, with the current folder searched last (the console script's
    sys.path does not hold it, `python -m` does)."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    return importlib.import_module(module_name)


def import_object(spec: str, key: str) -> object:
    """The object an import path `package.module:Name` names; ConfigError naming `key`, one line,
    for a malformed or unimportable path or a missing name."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name.isidentifier():
        raise ConfigError(f"{key}: {spec!r} is not an import path package.module:Name")
    try:
        module = _import(module_name)
    except Exception as exc:  # anything the import raises: missing module, syntax error, ...
        reason = (str(exc).splitlines() or [""])[0]
        raise ConfigError(f"{key}: cannot import {module_name!r} for {spec!r} "
                          f"({type(exc).__name__}: {reason})") from None
    found = getattr(module, name, None)
    if found is None:
        raise ConfigError(f"{key}: module {module_name!r} has no {name!r} (from {spec!r})")
    return found


def resolve(kind: str, spec: str, key: Optional[str] = None) -> tuple[type, dict]:
    """(family class, default options) that `spec` (a registered name or `package.module:Name`) names.

    kind: "prior" or "guide"; key: the config key to name in errors (default `model.<kind>`).
    Raises ConfigError, one line, for an unknown name, a malformed or unimportable path, or an
    object that is not an nn.Module class.
    """
    key = key or f"model.{kind}"
    registry = REGISTRIES[kind]
    if ":" not in spec:
        if spec not in registry:
            raise ConfigError(f"{key}: unknown {kind} {spec!r} (registered: {', '.join(registry)}; "
                              "or an import path package.module:Name)")
        family, defaults = registry[spec]
        return family, dict(defaults)
    family = import_object(spec, key)
    if not (inspect.isclass(family) and issubclass(family, nn.Module)):
        raise ConfigError(f"{key}: {spec!r} is not an nn.Module class")
    return family, {}


#: The config keys that may name code by an import path.
CODE_KEYS = ("model.prior", "model.guide", "inference.objective")


def check_trusted(config, source: str, trust_code: bool) -> None:
    """ConfigError (one line, naming `source`, the key and the module) when `config` (read from a
    run folder's config.yaml at `source`) names a prior, a guide or an objective by an import path
    and `trust_code` is False: importing it would run that module's code. The registered names
    (without a colon) are always used."""
    if trust_code:
        return
    for key in CODE_KEYS:
        section, name = key.split(".")
        spec = getattr(getattr(config, section), name)
        if ":" in spec:
            raise ConfigError(f"{source}: {key}: {spec!r} would import module {spec.partition(':')[0]!r}, "
                              f"which is not a registered {name}; pass --trust-code if you trust the code "
                              "that run names")


def option_names(family: type) -> Optional[list[str]]:
    """The keyword options the family's constructor takes beyond the four positional ones
    (None: it takes any, **kwargs)."""
    params = list(inspect.signature(family.__init__).parameters.values())[1:]  # without self
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in POSITIONAL and p.kind is not p.VAR_POSITIONAL]


def check_family(kind: str, spec: str, options: dict, section: str = "model") -> tuple[type, dict]:
    """Validate `<section>.<kind>` and its `<section>.<kind>_options` keys; return the family class
    and its options (the registry's defaults updated with `options`)."""
    family, defaults = resolve(kind, spec, f"{section}.{kind}")
    accepted = option_names(family)
    unknown = [name for name in options if accepted is not None and name not in accepted]
    if unknown:
        raise ConfigError(f"{section}.{kind}_options: {spec!r} takes no option {unknown[0]!r} "
                          f"(its options: {', '.join(accepted) or 'none'})")
    return family, {**defaults, **options}


def build_family(kind: str, spec: str, in_features: int, z_dim: int, hidden: Sequence[int], dropout: float,
                 options: Optional[dict] = None, section: str = "model") -> nn.Module:
    """Family(in_features, z_dim, hidden, dropout, **options) for the `spec` of `<section>.<kind>`.

    A constructor's TypeError or ValueError (an option of the wrong type or out of range) becomes a
    ConfigError naming `<section>.<kind>_options`.
    """
    family, options = check_family(kind, spec, dict(options or {}), section)
    try:
        return family(in_features, z_dim, list(hidden), dropout, **options)
    except (TypeError, ValueError) as exc:
        reason = (str(exc).splitlines() or [""])[0]
        raise ConfigError(f"{section}.{kind}_options: {spec!r} rejected its options ({reason})") from None


@torch.no_grad()
def probe(net: nn.Module, width: int) -> Distribution:
    """What a family gives: `net` called once, in eval mode, on a batch of two zero feature vectors
    of width `width` (on its parameters' device)."""
    reference = next(iter(net.parameters()), None)
    x = torch.zeros(2, width, device=None if reference is None else reference.device)
    was_training = net.training
    net.eval()
    try:
        return net(x)
    finally:
        net.train(was_training)


def kl_pairing(posterior_net: nn.Module, prior_net: nn.Module, text_features: int, image_features: int) -> dict:
    """What the KL(q || p) of this pairing is: {"analytic": bool, "guide_rsample": bool, "q": name, "p": name},
    from one :func:`probe` of each network."""
    q, p = probe(posterior_net, text_features), probe(prior_net, image_features)
    try:
        kl_divergence(q, p)
        analytic = True
    except NotImplementedError:
        analytic = False
    return {"analytic": analytic, "guide_rsample": bool(q.has_rsample), "q": type(q).__name__,
            "p": type(p).__name__}


def require_analytic_kl(elbo: str, posterior_net: nn.Module, prior_net: nn.Module, text_features: int,
                        image_features: int) -> None:
    """ConfigError (naming `inference.elbo`) unless the pairing has an analytic KL and a
    reparameterised guide, as the meanfield estimators promise."""
    pairing = kl_pairing(posterior_net, prior_net, text_features, image_features)
    if not pairing["analytic"]:
        raise ConfigError(f"inference.elbo: {elbo} needs an analytic KL(q || p), and there is none for "
                          f"q = {pairing['q']} ({type(posterior_net).__name__}) and p = {pairing['p']} "
                          f"({type(prior_net).__name__}); use elbo: trace (Monte Carlo KL)")
    if not pairing["guide_rsample"]:
        raise ConfigError(f"inference.elbo: {elbo} needs a reparameterised guide, and "
                          f"{type(posterior_net).__name__} gives no rsample; use elbo: trace")
