"""The guide's trainable text block: one Transformer encoder block over the frozen token states, pooled.

The paper (Sec. 3.5) passes the frozen ClinicalBERT states through "a single trainable Transformer
encoder block" before the MLP of the posterior q(z_T | x_T); the frozen encoder is
`vkd_pyro.encoders.text.FrozenTextEncoder`.
"""

from __future__ import annotations

import torch
from torch import nn

from vkd_pyro.errors import UserError


class TextHead(nn.Module):
    """The single trainable Transformer encoder block over frozen token states, then pooling.

    forward(states (B, T, H), mask (B, T) True at real tokens) -> (B, H): one post-LN
    nn.TransformerEncoderLayer (GELU, BERT-style) whose attention ignores padded keys, pooled by the
    first ([CLS]) token (`pooling="cls"`) or by the mean over real tokens (`pooling="mean"`).
    With return_attention=True it also returns the block's attention weights (B, heads, T, T).

    `input_size`, when it differs from `hidden_size`, puts a linear projection of the frozen states
    (B, T, input_size) -> (B, T, hidden_size) before the block: a narrower block than the encoder's
    own layers, for CPU runs. Left out (None), the block is as wide as the encoder (the paper).
    """

    POOLINGS = ("cls", "mean")

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float = 0.1,
                 pooling: str = "cls", layer_norm_eps: float = 1e-12, input_size: int | None = None):
        super().__init__()
        self.project = (nn.Linear(input_size, hidden_size)
                        if input_size is not None and input_size != hidden_size else nn.Identity())
        if pooling not in self.POOLINGS:
            raise UserError(f"text head pooling {pooling!r}: use one of {', '.join(self.POOLINGS)}")
        if hidden_size % num_heads:
            raise UserError(f"text head: hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.block = nn.TransformerEncoderLayer(
            d_model=hidden_size, nhead=num_heads, dim_feedforward=intermediate_size, dropout=dropout,
            activation="gelu", batch_first=True, layer_norm_eps=layer_norm_eps)
        self.pooling = pooling
        self.out_features = int(hidden_size)

    @classmethod
    def for_encoder(cls, encoder, **options) -> "TextHead":
        """A head with the frozen encoder's width, head count and feed-forward width (one of its layers)."""
        return cls(encoder.hidden_size, encoder.num_attention_heads, encoder.intermediate_size, **options)

    def forward(self, states: torch.Tensor, mask: torch.Tensor, return_attention: bool = False):
        """Pooled features (B, H) of padded token states (float16 states are computed in the head's
        dtype); with return_attention, (features, attention)."""
        padding = ~mask.bool()
        states = self.project(states.to(self.block.linear1.weight.dtype))
        out = self.block(states, src_key_padding_mask=padding)
        if self.pooling == "cls":
            pooled = out[:, 0]
        else:
            real = mask.bool().unsqueeze(-1)
            total = torch.where(real, out, torch.zeros_like(out)).sum(dim=1)
            pooled = total / real.sum(dim=1).clamp_min(1).to(out.dtype)
        if not return_attention:
            return pooled
        # Post-LN block: its self-attention reads the input states, so this is the block's attention.
        _, attention = self.block.self_attn(states, states, states, key_padding_mask=padding,
                                            need_weights=True, average_attn_weights=False)
        return pooled, attention
