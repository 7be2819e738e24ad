"""What an objective is: the class every objective of vkd-pyro, and a user's own, derives from.

An objective decides everything that differs between Eq. 8 and its ablations and variants, and
nothing outside the objective classes asks which objective runs:

- the Pyro programs (:meth:`Objective.programs`: the model and the guide, built from the config's
  :class:`Parts`), the terms it records (`terms`, `vkd_pyro.inference.terms`: the columns of
  history.csv, the progress bar, diagnose and the sweep) and an explicit KL term, if any
  (:meth:`Objective.kl`, otherwise the ELBO's own at site "z");
- what it has, as attributes the trainer, the evaluator, the API and the sweep read: a guide
  q(z_T|x_T) (and so a KL term, the remedies and guide warm-up), a teacher q(y|z_T) on the reports
  (metrics.json's `teacher` block), whether it reads the reports, whether it predicts from images
  (Algorithm 2) or, with no image side, from the reports, whether the test ELBO can be evaluated
  on held-out records, whether it distils from a teacher run's soft targets (`inference.kd`);
- the config settings it cannot honour (:meth:`Objective.check`, before any data is read).

`inference.objective` names a registered objective (`vkd_pyro.objectives.OBJECTIVES`) or a class by
its import path `package.module:Name` (run folders that name one are loaded with --trust-code only).
"""

from __future__ import annotations

from typing import ClassVar, Optional

from torch import nn

from vkd_pyro.config import Config
from vkd_pyro.encoders.image import build_image_encoder
from vkd_pyro.encoders.text_head import TextHead
from vkd_pyro.errors import ConfigError, UserError
from vkd_pyro.guides import EHRPosterior
from vkd_pyro.inference.elbo import RecordedELBO
from vkd_pyro.inference.kl import KLSum, free_bits_kl_sum, is_diagonal_normal
from vkd_pyro.inference.stl import NotDetachable, require_detachable
from vkd_pyro.inference.terms import IMAGE_NLL, LOSS, Term
from vkd_pyro.objectives.resolve import build_family, probe, require_analytic_kl


class Parts:
    """The networks a config describes, each built when an objective asks for it: the image
    encoder, the prior family on its features, the trainable text block and the posterior family
    on its output. `dims` are the frozen text encoder's block sizes (`vkd_pyro.data.prepare.text_dims`),
    needed only for the text block."""

    def __init__(self, config: Config, dims: Optional[dict] = None):
        self.config, self.dims = config, dims

    def image_encoder(self) -> nn.Module:
        enc = self.config.image_encoder
        options = {"width": enc.width, "out_features": enc.out_features} if enc.name == "small_cnn" else {}
        return build_image_encoder(enc.name, enc.weights, **options)

    def family(self, kind: str, in_features: int) -> nn.Module:
        """The `model.prior` or `model.guide` family on features of width `in_features`."""
        m = self.config.model
        return build_family(kind, getattr(m, kind), in_features, m.z_dim, m.hidden, m.dropout,
                            getattr(m, f"{kind}_options"))

    def text_head(self) -> TextHead:
        """The one trainable Transformer block (and pooling) over the frozen encoder's token states."""
        if self.dims is None:
            raise ValueError("the text block needs the frozen encoder's sizes (prepare the data with reports)")
        text, dims = self.config.text_encoder, self.dims
        width = text.block_width or dims["hidden_size"]
        heads = text.block_heads or (dims["num_heads"] if width == dims["hidden_size"] else max(1, width // 32))
        ffn = text.block_ffn or dims["intermediate_size"] * width // dims["hidden_size"]
        if width % heads:
            raise UserError(f"text_encoder.block_heads: {heads} heads do not divide the block width {width}")
        return TextHead(width, heads, ffn, dropout=text.dropout, pooling=text.pooling,
                        input_size=dims["hidden_size"])


class Objective:
    """An objective: its programs, its terms, its KL term and what it has (see the module docstring).

    Subclasses set `name` and the class attributes below and implement :meth:`programs`; a subclass
    that records another term adds a :class:`~vkd_pyro.inference.terms.Term` to `terms`, and one
    whose KL term is not Pyro's KL(q || p) at site "z" overrides :meth:`kl`.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # a figure's caption (the name when empty)
    terms: ClassVar[tuple[Term, ...]] = (LOSS, IMAGE_NLL)  # recorded per step, in this order
    reported: ClassVar[Optional[tuple[str, ...]]] = None  # the terms the epoch line and progress bar show (None: all)
    has_guide: ClassVar[bool] = False  # q(z_T|x_T): a KL term; the remedies and guide warm-up apply
    has_teacher: ClassVar[bool] = False  # q(y|z_T) on the reports: metrics.json's `teacher` block
    reads_reports: ClassVar[bool] = False  # the data includes the reports' token states
    predicts_from: ClassVar[str] = "images"  # or "reports": no image side, evaluated through q(y|z_T)
    test_elbo: ClassVar[bool] = True  # its loss can be evaluated on held-out records (diagnose, sweep)
    distils: ClassVar[bool] = False  # trains on a teacher run's soft targets (`inference.kd`)
    unused_parameters: ClassVar[bool] = False  # some parameters get no gradient in some steps (DDP)

    def __init__(self, config: Config):
        self.config = config
        self.inference = config.inference

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("title"):
            cls.title = cls.__dict__.get("name") or cls.__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # ------------------------------------------------------------------ what subclasses define

    def programs(self, parts: Parts) -> tuple[nn.Module, nn.Module]:
        """(model, guide): the Pyro programs whose ELBO is minus this objective."""
        raise NotImplementedError

    def kl(self) -> Optional[KLSum]:
        """The explicit KL term, `(q, p) -> its sum over the batch`, added as beta * kl(q, p) with
        site "z" masked out of the ELBO; None: the ELBO's own KL(q || p) at site "z" (Eq. 8). The
        remedies (`inference.free_bits`, `inference.kl_gradient: prior`) give one here."""
        inf = self.inference
        if not self.has_guide or (inf.free_bits <= 0 and inf.kl_gradient == "both"):
            return None
        free_bits, prior_only = inf.free_bits, inf.kl_gradient == "prior"
        return lambda q, p: free_bits_kl_sum(q, p, free_bits, prior_only)

    def check(self) -> None:
        """ConfigError, one line naming the key, for settings this objective cannot honour; called
        before any data is read (the families' shapes are checked when the programs are built)."""
        inf = self.inference
        if not self.reads_reports and self.config.data.report_control != "none":
            raise ConfigError(f"data.report_control: objective {self.name} does not read the reports "
                              f"({self.config.data.report_control} would change nothing it sees)")
        if not self.has_guide:
            if inf.free_bits > 0:
                raise ConfigError(f"inference.free_bits: objective {self.name} has no KL term (no guide)")
            if inf.kl_gradient != "both":
                raise ConfigError(f"inference.kl_gradient: objective {self.name} has no KL term (no guide)")
            if inf.guide_warmup_epochs:
                raise ConfigError(f"inference.guide_warmup_epochs: objective {self.name} has no guide to warm up")

    # ------------------------------------------------------------------ derived

    @property
    def explicit_kl(self) -> bool:
        """Whether the KL term is added explicitly (:meth:`kl`) instead of by the ELBO at site "z"."""
        return self.kl() is not None

    @property
    def evaluation_reads_reports(self) -> bool:
        """Whether evaluating a trained run needs the reports: for the teacher q(y|z_T) only (a kd run
        read them to train, its evaluation does not)."""
        return self.reads_reports and self.has_teacher

    @property
    def reported_terms(self) -> tuple[Term, ...]:
        """The recorded terms the epoch line and the progress bar show (history.csv holds them all)."""
        return self.terms if self.reported is None else tuple(t for t in self.terms if t.name in self.reported)

    @property
    def find_unused_parameters(self) -> bool:
        """Whether DDP must look for parameters without a gradient (kl_gradient=prior detaches q)."""
        return self.unused_parameters or self.inference.kl_gradient == "prior"

    def describe(self) -> str:
        inf = self.inference
        kl = ", explicit KL" if self.explicit_kl else ""
        return (f"objective {self.name} ({inf.elbo} ELBO{kl}), L={inf.num_particles} guide particles, "
                f"M={inf.prior_samples} prior samples, S={inf.test_samples} test samples")

    def report_guide(self, parts: Parts, prior_net: Optional[nn.Module], image_features: Optional[int]) -> EHRPosterior:
        """The EHR posterior q(z_T|x_T) (text block + `model.guide` family), checked against the prior
        the KL pairs it with: an analytic KL for the meanfield estimator, parameters that can be detached
        from log q for the stl estimator, diagonal Normals for the remedies (their closed-form KL per
        dimension)."""
        head = parts.text_head()
        posterior_net = parts.family("guide", head.out_features)
        inf = self.inference
        if inf.elbo in RecordedELBO.ANALYTIC_KL and prior_net is not None:  # refuse, not a silent Monte Carlo KL
            require_analytic_kl(inf.elbo, posterior_net, prior_net, head.out_features, image_features)
        if inf.elbo in RecordedELBO.PATH_DERIVATIVE:  # refuse a flow now, not at the first step
            try:
                require_detachable(probe(posterior_net, head.out_features))
            except NotDetachable as exc:
                raise ConfigError(str(exc)) from None
        if inf.free_bits > 0 or inf.kl_gradient != "both":
            key = "inference.free_bits" if inf.free_bits > 0 else "inference.kl_gradient"
            nets = [("guide", posterior_net, head.out_features)]
            if prior_net is not None:
                nets.append(("prior", prior_net, image_features))
            for kind, net, width in nets:
                if not is_diagonal_normal(probe(net, width)):
                    raise ConfigError(f"{key}: needs a diagonal Normal {kind} (its closed-form KL per dimension), "
                                      f"and model.{kind} = {getattr(self.config.model, kind)!r} is not one")
        return EHRPosterior(head, posterior_net=posterior_net)

