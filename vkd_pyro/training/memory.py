"""The memory that evaluating or predicting a batch implies, estimated before it is allocated.

Algorithm 2 runs under no_grad on a batch of B images of P = data.image_size^2 pixels with S prior
samples, vectorised over the samples. At its peak it holds, 4 bytes a float:

    images   B x P x (1 + a)                        the batch and the image encoder's largest set of
                                                    activations alive at once, `a` floats a pixel
    samples  S x B x (2 z + F + sum(h) + 2 C) x 2   z (S, B, z) and the prior's draw, the classifier's
                                                    input [z, x_I] (S, B, z + F), its hidden layers h,
                                                    the logits and probabilities (S, B, C); twice that
                                                    for temporaries (SAMPLE_FLOATS_SAFETY)

with z = model.z_dim, F the encoder's features (1024 for densenet121, image_encoder.out_features for
small_cnn), h = model.hidden, C = 14 classes. `a` (:func:`encoder_floats_per_pixel`) is 2 + 2 w for
small_cnn of width w (the centred input, the first block's convolution and batch norm at full
resolution; 33.8 and 17.9 measured beyond the input for w = 16 and 8, as the growth of the peak
resident memory on the CPU) and 64 for densenet121 (the last layer of its first dense block, at a
sixteenth of the pixels, holds the block's 224 earlier channels, their concatenation and its batch
norm and the 128-channel bottleneck: 50; 53 to 61 measured).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vkd_pyro.classes import CLASSES
from vkd_pyro.config import Config
from vkd_pyro.errors import UserError

FLOAT_BYTES = 4
SAMPLE_FLOATS_SAFETY = 2  # temporaries beside the sample tensors counted
DENSENET_FLOATS_PER_PIXEL = 64
DENSENET_FEATURES = 1024


def encoder_floats_per_pixel(config: Config) -> int:
    """`a`: floats a pixel of the input that the image encoder holds at once at its peak (module docstring)."""
    encoder = config.image_encoder
    return DENSENET_FLOATS_PER_PIXEL if encoder.name == "densenet121" else 2 + 2 * encoder.width


def image_bytes(config: Config, batch: int) -> int:
    """B x P x (1 + a) x 4: a batch of `batch` images and the encoder's activations."""
    pixels = config.data.image_size ** 2
    return FLOAT_BYTES * batch * pixels * (1 + encoder_floats_per_pixel(config))


def sample_floats(config: Config) -> int:
    """2 z + F + sum(h) + 2 C: the floats one (sample, image) pair holds (module docstring)."""
    features = DENSENET_FEATURES if config.image_encoder.name == "densenet121" else config.image_encoder.out_features
    return 2 * config.model.z_dim + features + sum(config.model.hidden) + 2 * len(CLASSES)


def sample_bytes(config: Config, batch: int, samples: int) -> int:
    """S x B x (2 z + F + sum(h) + 2 C) x 2 x 4: the prior samples of a batch and what they feed."""
    return FLOAT_BYTES * samples * batch * sample_floats(config) * SAMPLE_FLOATS_SAFETY


def estimate_bytes(config: Config, batch: int, samples: int) -> int:
    """Bytes that Algorithm 2 holds at once for `batch` images and `samples` prior samples:
    :func:`image_bytes` + :func:`sample_bytes` (the formula in the module docstring)."""
    return image_bytes(config, batch) + sample_bytes(config, batch, samples)


def available_bytes(device: torch.device) -> int:
    """Memory free for tensors now: the GPU's free memory on CUDA, otherwise the host's MemAvailable
    (/proc/meminfo), or its free physical pages where there is no /proc."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _gib(size: int) -> str:
    return f"{size / 2**30:,.3g} GiB"


def check_memory(config: Config, batch: int, samples: int, device: torch.device, batch_key: str,
                 samples_key: str) -> None:
    """UserError (one line) when :func:`estimate_bytes` for `batch` images and `samples` prior samples
    exceeds :func:`available_bytes` on `device`. The line names `samples_key` and `batch_key` (where the
    two numbers came from: a config key or a command-line option) and data.image_size, the estimate
    (images and samples) against what is available, and the most samples and the largest batch that
    would fit."""
    need, have = estimate_bytes(config, batch, samples), available_bytes(device)
    if need <= have:
        return
    images = image_bytes(config, batch)
    per_image = image_bytes(config, 1) + sample_bytes(config, 1, samples)
    most_samples = (have - images) // sample_bytes(config, batch, 1)
    most_batch = have // per_image
    advice = [f"{samples_key} (at most about {most_samples:,} with this batch)" if most_samples >= 1 else None,
              f"{batch_key} (at most about {most_batch:,} with these samples)" if most_batch >= 1 else None]
    shown = " or ".join(a for a in advice if a) or \
        f"both (one image with one sample needs about {_gib(estimate_bytes(config, 1, 1))})"
    raise UserError(f"{samples_key} {samples}: a batch of {batch} images ({batch_key}) at data.image_size "
                    f"{config.data.image_size} would need about {_gib(need)} at once ({_gib(images)} for the images "
                    f"through the encoder, {_gib(need - images)} for the samples), and {device.type} has "
                    f"{_gib(have)} available; lower {shown}")
