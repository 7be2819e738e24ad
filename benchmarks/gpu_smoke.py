"""GPU smoke test and throughput of the paper's configuration on synthetic tensors.

Builds the paper's module with vkd_pyro's own builder (DenseNet-121 on 224 x 224 grey images,
z of 512, prior and posterior MLPs {512, 512} with dropout 0.5, the trainable Transformer block at
the text encoder's full width: 384 (all-MiniLM-L6-v2, the packaged stand-in) or 768
(ClinicalBERT)) and trains it with the training loop's own step (`vkd_pyro.training.loop.TrainStep`,
Trace_ELBO, Adam) on random tensors already on the device: images, frozen-encoder token states of
`--tokens` tokens (a random number of them real), labels. Nothing is downloaded or read from disk.

For each precision asked (`--amp none bf16`) it prints ms per step, images per second and the peak
GPU memory, then the bf16 speed-up. The loss terms stay on the device during the timed steps and
are read once at the end (and must be finite).

    benchmarks/gpu_smoke.sh                                   # a GPU: 300 steps of batch 32, fp32 and bf16
    .venv/bin/python benchmarks/gpu_smoke.py --device cpu --steps 2 --warmup 1 --batch-size 2 --image-size 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import torch  # noqa: E402

from vkd_pyro.classes import NUM_CLASSES  # noqa: E402
from vkd_pyro.config import load_config  # noqa: E402
from vkd_pyro.data.batching import Batch  # noqa: E402
from vkd_pyro.training.build import build_module  # noqa: E402
from vkd_pyro.training.loop import TrainStep, adam  # noqa: E402

TEXT_BLOCKS = {384: {"hidden_size": 384, "num_heads": 12, "intermediate_size": 1536},   # all-MiniLM-L6-v2
               768: {"hidden_size": 768, "num_heads": 12, "intermediate_size": 3072}}   # ClinicalBERT


def synthetic_batch(batch: int, image_size: int, tokens: int, width: int, device, generator) -> Batch:
    """Random images in [0, 1], token states, masks with 16..tokens real tokens, 20% positive labels."""
    lengths = torch.randint(min(16, tokens), tokens + 1, (batch,), generator=generator)
    mask = torch.arange(tokens)[None, :] < lengths[:, None]
    return Batch(images=torch.rand(batch, 1, image_size, image_size, generator=generator),
                 labels=(torch.rand(batch, NUM_CLASSES, generator=generator) < 0.2).float(),
                 index=torch.arange(batch), token_states=torch.randn(batch, tokens, width, generator=generator),
                 token_mask=mask).to(device)


def run(amp: str, args, device) -> dict:
    """Train `args.warmup` then `args.steps` timed steps; return ms/step, images/s, peak memory."""
    config = load_config(None, [
        "image_encoder.name=densenet121", "image_encoder.weights=none", f"data.image_size={args.image_size}",
        "model.z_dim=512", "model.hidden=[512, 512]", "model.dropout=0.5", f"train.amp={amp}",
        f"image_encoder.channels_last={str(args.channels_last).lower()}",
        f"inference.num_particles={args.particles}", f"inference.prior_samples={args.particles}"])
    pyro.set_rng_seed(0)
    module = build_module(config, TEXT_BLOCKS[args.text_width]).to(device)
    module.train()
    step = TrainStep(module, module, adam(module, lr=1e-4))
    generator = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(args.batch_size, args.image_size, args.tokens, args.text_width, device, generator)
               for _ in range(4)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total = torch.zeros(4, device=device)
    with pyro.validation_enabled(False):
        for i in range(args.warmup):
            step(batches[i % len(batches)], 1.0, args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for i in range(args.steps):
            terms, _ = step(batches[i % len(batches)], 1.0, args.batch_size)
            total += terms
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    mean = (total / max(args.steps, 1)).tolist()
    if not all(map(lambda v: v == v and abs(v) != float("inf"), mean)):
        raise SystemExit(f"amp={amp}: the loss terms are not finite: {mean}")
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"ms": seconds / args.steps * 1000, "images_per_s": args.steps * args.batch_size / seconds,
            "memory_gib": memory, "loss": mean[0],
            "parameters": sum(p.numel() for p in module.parameters() if p.requires_grad)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per precision (default 300)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--tokens", type=int, default=128, help="padded report length (the paper: at most 256)")
    parser.add_argument("--text-width", type=int, default=384, choices=sorted(TEXT_BLOCKS))
    parser.add_argument("--particles", type=int, default=1, help="L = M Monte Carlo samples")
    parser.add_argument("--amp", nargs="+", default=["none", "bf16"], choices=["none", "bf16"])
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = "CPU"
    print(f"device: {name}; torch {torch.__version__}, pyro {pyro.__version__}")
    print(f"DenseNet-121 at {args.image_size}, z 512, MLPs [512, 512], text block width {args.text_width}, "
          f"{args.tokens} tokens, batch {args.batch_size}, L = M = {args.particles}, "
          f"channels-last {args.channels_last}; {args.warmup} warm-up + {args.steps} timed steps")
    results = {}
    for amp in args.amp:
        r = results[amp] = run(amp, args, device)
        print(f"amp {amp:>4}: {r['ms']:8.1f} ms/step  {r['images_per_s']:8.1f} images/s  "
              f"peak memory {r['memory_gib']:.2f} GiB  mean loss {r['loss']:.3f}  "
              f"({r['parameters']:,} trainable parameters)", flush=True)
    if "none" in results and "bf16" in results:
        print(f"bf16 speed-up: {results['bf16']['images_per_s'] / results['none']['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
