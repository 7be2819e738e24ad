"""Speed options for the networks: bf16 mixed precision and channels-last, without changing weights.

- `train.amp: bf16`: the image backbone and the text block run under `torch.autocast(bfloat16)` and
  return float32 features, so that everything probabilistic (the Gaussians' parameters, log
  densities, KL, the Bernoulli likelihoods) stays float32. bf16 has float32's exponent range, so
  no loss scaling is needed. The parameters stay float32 (autocast casts on the fly), and the
  state dict, its keys and the checkpoints are those of a float32 run.
- `image_encoder.channels_last: true`: the backbone's weights (and so its activations) in NHWC
  layout, which GPU convolutions with tensor cores prefer. Module.to() and load_state_dict keep it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16}


def autocast_forward(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make `module`'s forward run under autocast(`dtype`) on its input's device and return float32.

    The wrapper replaces the instance's `forward` (parameters, buffers and state-dict keys are
    untouched). The output is a tensor, or a tuple whose tensors are each cast back to float32.
    """
    if getattr(module, "_autocast_dtype", None) is not None:
        return module
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        device_type = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
        with torch.autocast(device_type=device_type, dtype=dtype):
            out = inner(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.float() if torch.is_tensor(o) and o.is_floating_point() else o for o in out)
        return out.float()

    module.forward = forward
    module._autocast_dtype = dtype
    return module


def apply_speed_options(module: nn.Module, amp: str = "none", channels_last: bool = False) -> nn.Module:
    """Apply `train.amp` and `image_encoder.channels_last` to a VKDModule's networks, in place.

    amp (bf16) wraps the image encoder (`module.model.image_encoder`, when there is one) and, when the guide has one,
    the trainable text block (`module.guide.text_head`). Returns the module.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    encoder = getattr(module.model, "image_encoder", None)  # None: objective text_only has no image side
    if channels_last and encoder is not None:
        encoder.to(memory_format=torch.channels_last)
    dtype = AMP_DTYPES[amp]
    if dtype is not None:
        if encoder is not None:
            autocast_forward(encoder, dtype)
        text_head = getattr(module.guide, "text_head", None)
        if isinstance(text_head, nn.Module):
            autocast_forward(text_head, dtype)
    return module
