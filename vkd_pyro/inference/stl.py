"""The path-derivative ("sticking the landing") gradient of the ELBO: `inference.elbo: stl`.

Roeder, Wu and Duvenaud (2017), "Sticking the landing: simple, lower-variance gradient estimators
for variational inference" (NeurIPS 2017). With z = g_phi(eps), eps ~ p(eps), the total derivative
of one draw of the ELBO is

    d/dphi [log p(x, z) - log q_phi(z)] = d/dz [log p(x, z) - log q_phi(z)] dz/dphi   (path derivative)
                                          - d/dphi log q_phi(z) |_z fixed                (score term)

and the score term has expectation zero under q_phi. The estimator keeps the path derivative alone:
log q is evaluated with phi held fixed (stop-gradient) while z keeps its reparameterised path. Its
expectation is that of Trace_ELBO's gradient, and where q_phi(z) is the exact posterior p(z | x),
log p(x, z) - log q_phi(z) = log p(x) does not depend on z, so every draw's gradient is exactly 0.

Through Pyro's public handlers only: :class:`PathDerivativeELBO` is Trace_ELBO on the guide run
under :class:`PathDerivative`, an effect handler that gives each reparameterised guide site a
:class:`StopGradientScore` of its distribution (draws with its `rsample`, scores with
:func:`detached`). The loss value is Trace_ELBO's on the same draws; only its gradient differs.
"""

from __future__ import annotations

import copy

import torch
from pyro.distributions import TorchDistribution
from pyro.infer import Trace_ELBO
from pyro.poutine.messenger import Messenger
from torch.distributions import Distribution, Transform


class NotDetachable(ValueError):
    """A guide distribution whose parameters :func:`detached` cannot hold fixed (the objectives turn it
    into a one-line ConfigError naming `inference.elbo`)."""


PLAIN = (bool, int, float, str, type(None), torch.Size)  # attribute values that hold no parameters
TRANSFORM_CACHE = ("_inv", "_cached_x_y")  # a transform's inverse and its last (x, y), not its parameters


def detached(fn: Distribution) -> Distribution:
    """A shallow copy of `fn` whose tensors are detached, and so are those of the distributions it
    holds (an Independent's base_dist, a mixture's components, a mask's or an expansion's base):
    the same log density at the same value, with no gradient to its parameters.

    A transform is kept when all it holds is plain data (e.g. ExpTransform); NotDetachable (one line,
    naming `inference.elbo`) refuses one that holds anything else (a normalising flow's
    transforms hold their networks) and any attribute of a type this copy does not know."""
    copied = copy.copy(fn)
    copied.__dict__.update({key: _detached(value, fn, key) for key, value in vars(fn).items()})
    return copied


def _detached(value, owner: Distribution, key: str):
    """One attribute of `owner` for :func:`detached`."""
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, Distribution):
        return detached(value)
    if type(value) in (tuple, list):
        return type(value)(_detached(item, owner, key) for item in value)
    if isinstance(value, PLAIN) or (isinstance(value, Transform) and _parameter_free(value)):
        return value
    raise NotDetachable(f"inference.elbo: stl scores log q(z) with the guide's parameters detached, and "
                      f"{type(owner).__name__}.{key} holds {type(value).__name__}, which may hold parameters "
                      "that cannot be detached (a normalising flow's transforms hold their networks); use elbo: trace")


def _parameter_free(transform: Transform) -> bool:
    """Whether all a transform holds, its cache aside, is plain data (no tensor, network or callable)."""
    return all(isinstance(value, PLAIN) for key, value in vars(transform).items() if key not in TRANSFORM_CACHE)


def require_detachable(fn: Distribution) -> None:
    """NotDetachable naming `inference.elbo` unless :func:`detached` can copy `fn`: the check the
    objectives run on a probe of the guide's family when the module is built."""
    detached(fn)


class StopGradientScore(TorchDistribution):
    """q_phi as the STL estimator sees it: draws z = g_phi(eps) with `fn.rsample` (the live parameters,
    the path through phi kept) and scores log q_phi(z) with :func:`detached` (stop-gradient on phi)."""

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, fn: Distribution):
        self.fn, self.scored = fn, detached(fn)
        super().__init__(fn.batch_shape, fn.event_shape, validate_args=False)

    @property
    def support(self):
        return self.fn.support

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self.fn.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.scored.log_prob(value)

    def expand(self, batch_shape, _instance=None) -> StopGradientScore:
        return StopGradientScore(self.fn.expand(batch_shape))


class PathDerivative(Messenger):
    """The effect handler of the STL estimator, around the guide: each sample site the guide draws by
    reparameterisation (not observed, `fn.has_rsample`) goes to Pyro's trace (outside this handler)
    with :class:`StopGradientScore` of its distribution. After the draw, once that trace has taken
    its copy of the site, the message gets the distribution itself back, so that the handlers inside
    (the terms :class:`~vkd_pyro.inference.elbo.RecordedELBO` records, an objective's explicit KL)
    read q_phi as under `trace`. Other sites are left alone (Pyro's score-function gradient)."""

    def _pyro_sample(self, msg) -> None:
        if not msg["is_observed"] and msg["fn"].has_rsample:
            msg["fn"] = StopGradientScore(msg["fn"])

    def _pyro_post_sample(self, msg) -> None:
        if isinstance(msg["fn"], StopGradientScore):
            msg["fn"] = msg["fn"].fn


class PathDerivativeELBO(Trace_ELBO):
    """The path-derivative ("sticking the landing") ELBO estimator of Roeder, Wu and Duvenaud (2017):
    Trace_ELBO on the guide run under :class:`PathDerivative`. Per draw z = g_phi(eps), its gradient is

        d/dz [log p(x, z) - log q_phi(z)] |_{z = g_phi(eps)} dz/dphi

    i.e. Trace_ELBO's without the score term -d/dphi log q_phi(z) (zero mean): the same expectation,
    and zero variance where q_phi is the exact posterior. The loss value is Trace_ELBO's on the same
    draws. Guide sites without `rsample` keep Trace_ELBO's score-function gradient."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return super().differentiable_loss(model, PathDerivative()(guide), *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        return super().loss_and_grads(model, PathDerivative()(guide), *args, **kwargs)
