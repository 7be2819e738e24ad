"""Build the probabilistic module a config describes: image encoder, model, guide, ELBO (and check its families)."""

from __future__ import annotations

from typing import Optional

from vkd_pyro.classes import NUM_CLASSES
from vkd_pyro.config import Config
from vkd_pyro.encoders.image import build_image_encoder
from vkd_pyro.encoders.text import TextHead
from vkd_pyro.errors import UserError
from vkd_pyro.guides import EHRPosterior, NoGuide
from vkd_pyro.inference.elbo import MEANFIELD_ELBOS
from vkd_pyro.inference.module import VKDModule
from vkd_pyro.models import VKDModel
from vkd_pyro.training.accel import apply_speed_options
from vkd_pyro.training.families import build_family, check_family, require_analytic_kl


def check_families(config: Config) -> None:
    """ConfigError, one line naming the key, unless `model.prior` / `model.guide` name families that
    import and take the options given (`vkd_pyro.training.families`): checked before any data is read."""
    check_family("prior", config.model.prior, config.model.prior_options)
    check_family("guide", config.model.guide, config.model.guide_options)


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
    """The VKD module of `config`. `dims` (`vkd_pyro.data.prepare.text_dims`) are needed when reports are used."""
    enc = config.image_encoder
    options = {"width": enc.width, "out_features": enc.out_features} if enc.name == "small_cnn" else {}
    image_encoder = build_image_encoder(enc.name, enc.weights, **options)
    objective, m = config.inference.objective, config.model
    features = image_encoder.out_features
    prior_net = build_family("prior", m.prior, features, m.z_dim, m.hidden, m.dropout, m.prior_options)
    model = VKDModel(image_encoder, NUM_CLASSES, z_dim=m.z_dim, prior_samples=config.inference.prior_samples,
                     latent_from_guide=config.inference.uses_reports, mutual_information=objective == "vkd",
                     prior_net=prior_net)
    if config.inference.uses_reports:
        head = build_text_head(config, dims)
        posterior_net = build_family("guide", m.guide, head.out_features, m.z_dim, m.hidden, m.dropout,
                                     m.guide_options)
        if config.inference.elbo in MEANFIELD_ELBOS:  # refuse, rather than a silent Monte Carlo KL
            require_analytic_kl(config.inference.elbo, posterior_net, prior_net, head.out_features, features)
        guide = EHRPosterior(head, posterior_net=posterior_net)
    else:
        guide = NoGuide()
    module = VKDModule(model, guide, elbo=config.inference.elbo, num_particles=config.inference.num_particles)
    return apply_speed_options(module, config.train.amp, config.image_encoder.channels_last)  # vkd_pyro.training.accel
