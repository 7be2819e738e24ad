"""Feature extractors for the two modalities of VKD.

`vkd_pyro.encoders.image`: CNN backbones mapping a grayscale X-ray batch (B, 1, H, W) in [0, 1] to
features (B, F) -- the x_I of the conditional prior p(z_I | x_I) and the classifier.

`vkd_pyro.encoders.text`: a frozen BERT-style encoder (ClinicalBERT in the paper, all-MiniLM-L6-v2
offline here); `vkd_pyro.encoders.text_head`: the single trainable Transformer encoder block on top
of it -- the x_T of the variational posterior q(z_T | x_T).
"""

from vkd_pyro.encoders.image import IMAGE_ENCODERS, build_image_encoder
from vkd_pyro.encoders.text import (
    PACKAGED_TEXT_ENCODER,
    FrozenTextEncoder,
    pad_token_states,
    resolve_text_model,
)
from vkd_pyro.encoders.text_head import TextHead

__all__ = [
    "IMAGE_ENCODERS",
    "build_image_encoder",
    "PACKAGED_TEXT_ENCODER",
    "FrozenTextEncoder",
    "TextHead",
    "pad_token_states",
    "resolve_text_model",
]
