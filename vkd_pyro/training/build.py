"""Build the probabilistic module a config describes: image encoder, model, guide, ELBO (and check its families)."""

from __future__ import annotations

from typing import Optional

import torch

from vkd_pyro.classes import NUM_CLASSES
from vkd_pyro.config import Config
from vkd_pyro.encoders.image import build_image_encoder
from vkd_pyro.encoders.text import TextHead
from vkd_pyro.errors import ConfigError, UserError
from vkd_pyro.guides import EHRPosterior, NoGuide
from vkd_pyro.inference.elbo import MEANFIELD_ELBOS, is_diagonal_normal
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.models import DistilledModel, ReportBottleneck, VKDModel
from vkd_pyro.training.accel import apply_speed_options
from vkd_pyro.training.families import build_family, check_family, require_analytic_kl


def check_families(config: Config) -> None:
    """ConfigError, one line naming the key, unless `model.prior` / `model.guide` name families that
    import and take the options given (`vkd_pyro.training.families`): checked before any data is read."""
    check_family("prior", config.model.prior, config.model.prior_options)
    check_family("guide", config.model.guide, config.model.guide_options)


def check_objective(config: Config) -> None:
    """ConfigError, one line naming the key, for settings the objective cannot honour: `kd` without
    `inference.kd.teacher`; the KL remedies (free_bits, kl_gradient=prior) without a KL term (no guide).
    Checked before any data is read; the families' shapes are checked when the module is built."""
    inf = config.inference
    if inf.objective == "kd" and not inf.kd.teacher:
        raise ConfigError("inference.kd.teacher: objective kd needs a finished text_only run folder as its teacher")
    if not inf.has_guide:
        if inf.free_bits > 0:
            raise ConfigError(f"inference.free_bits: objective {inf.objective} has no KL term (no guide)")
        if inf.kl_gradient != "both":
            raise ConfigError(f"inference.kl_gradient: objective {inf.objective} has no KL term (no guide)")
        if inf.guide_warmup_epochs:
            raise ConfigError(f"inference.guide_warmup_epochs: objective {inf.objective} has no guide to warm up")


@torch.no_grad()
def _gives_diagonal_normal(net: torch.nn.Module, width: int) -> bool:
    """Whether `net` maps a batch of two zero feature vectors to a diagonal Normal (one call, eval mode)."""
    was_training = net.training
    net.eval()
    try:
        return is_diagonal_normal(net(torch.zeros(2, width)))
    finally:
        net.train(was_training)


def require_diagonal_normals(config: Config, posterior_net, prior_net, text_features: int,
                             image_features: Optional[int]) -> None:
    """ConfigError naming the remedy's key unless guide (and prior, when it is a network) are diagonal
    Normals: free bits and kl_gradient=prior use their closed-form KL per dimension."""
    inf = config.inference
    key = "inference.free_bits" if inf.free_bits > 0 else "inference.kl_gradient"
    nets = [("model.guide", posterior_net, text_features)]
    if prior_net is not None:
        nets.append(("model.prior", prior_net, image_features))
    for name, net, width in nets:
        if not _gives_diagonal_normal(net, width):
            raise ConfigError(f"{key}: needs a diagonal Normal {name.split('.')[1]} (its closed-form KL per "
                              f"dimension), and {name} = {getattr(config.model, name.split('.')[1])!r} is not one")


def build_text_head(config: Config, dims: dict) -> TextHead:
    """The one trainable Transformer block (and pooling) over the frozen encoder's token states."""
    text = config.text_encoder
    width = text.block_width or dims["hidden_size"]
    heads = text.block_heads or (dims["num_heads"] if width == dims["hidden_size"] else max(1, width // 32))
    ffn = text.block_ffn or dims["intermediate_size"] * width // dims["hidden_size"]
    if width % heads:
        raise UserError(f"text_encoder.block_heads: {heads} heads do not divide the block width {width}")
    return TextHead(width, heads, ffn, dropout=text.dropout, pooling=text.pooling, input_size=dims["hidden_size"])


def build_module(config: Config, dims: Optional[dict] = None) -> VKDModule:
    """The module of `config`. `dims` (`vkd_pyro.data.prepare.text_dims`) are needed when reports are used.

    vkd / no_mi: VKDModel + EHRPosterior; image_only: VKDModel without a latent site + NoGuide;
    text_only: ReportBottleneck (N(0, I) prior, the MI head) + EHRPosterior, no image side;
    kd: DistilledModel + NoGuide (its soft targets are set by the trainer, `vkd_pyro.training.teacher`).
    """
    inf, m = config.inference, config.model
    objective = inf.objective
    if objective == "text_only":
        model, prior_net, features = ReportBottleneck(NUM_CLASSES, z_dim=m.z_dim), None, None
    else:
        enc = config.image_encoder
        options = {"width": enc.width, "out_features": enc.out_features} if enc.name == "small_cnn" else {}
        image_encoder = build_image_encoder(enc.name, enc.weights, **options)
        features = image_encoder.out_features
        prior_net = build_family("prior", m.prior, features, m.z_dim, m.hidden, m.dropout, m.prior_options)
        if objective == "kd":
            model = DistilledModel(image_encoder, NUM_CLASSES, z_dim=m.z_dim, prior_samples=inf.prior_samples,
                                   prior_net=prior_net, alpha=inf.kd.alpha, temperature=inf.kd.temperature)
        else:
            model = VKDModel(image_encoder, NUM_CLASSES, z_dim=m.z_dim, prior_samples=inf.prior_samples,
                             latent_from_guide=inf.has_guide, mutual_information=objective == "vkd",
                             prior_net=prior_net)
    if inf.has_guide:
        head = build_text_head(config, dims)
        posterior_net = build_family("guide", m.guide, head.out_features, m.z_dim, m.hidden, m.dropout,
                                     m.guide_options)
        if inf.elbo in MEANFIELD_ELBOS and prior_net is not None:  # refuse, rather than a silent Monte Carlo KL
            require_analytic_kl(inf.elbo, posterior_net, prior_net, head.out_features, features)
        if inf.free_bits > 0 or inf.kl_gradient != "both":
            require_diagonal_normals(config, posterior_net, prior_net, head.out_features, features)
        guide = EHRPosterior(head, posterior_net=posterior_net)
    else:
        guide = NoGuide()
    module = VKDModule(model, guide, elbo=inf.elbo, num_particles=inf.num_particles, free_bits=inf.free_bits,
                       kl_gradient=inf.kl_gradient)
    return apply_speed_options(module, config.train.amp, config.image_encoder.channels_last)  # vkd_pyro.training.accel
