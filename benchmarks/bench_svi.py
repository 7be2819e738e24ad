"""The VKD SVI step in Pyro against the same loss written by hand in plain PyTorch, side by side.

Both sides: batch 64, 1024-d image and 384-d text features as cached inputs (benchmarks/common.py),
z of 512, MLPs {512, 512} with dropout 0.5, both classifiers, L = M in {1, 4, 16}; one step =
forward + backward + Adam. The networks are identical (the hand side is a copy of the Pyro side's
weights).

- Pyro: `VKDModule.forward` (Trace_ELBO, L vectorised particles, the term recorder), as
  `vkd_pyro.training.loop` runs it: through `TrainStep` with Pyro's validation off.
- PyTorch: the same Monte Carlo estimator of minus Eq. 8 written out: z_T = mu_q + sigma_q eps
  (L draws), z_I = mu_p + sigma_p eps (M draws), Bernoulli log-likelihoods with
  binary_cross_entropy_with_logits, KL by its Monte Carlo estimate log q(z_T) - log p(z_T) from
  the Gaussian log density, beta on the KL.

Prints ms per step (median of timed rounds, the sides taking turns) and the ratio Pyro/PyTorch
(target: at most 1.05). "Pyro eager" is the same module with the diagonal Gaussians as pyro's own
Normal instead of the families' `vkd_pyro.models.distributions.BroadcastNormal` (identical values; the eager
one computes its log densities on the L-fold expanded parameters). `--validation` also times Pyro with its
argument checks on (Pyro's default; vkd_pyro.training.loop turns them off); `--unfused` both sides with torch's default Adam
(one parameter at a time on the CPU) instead of the fused Adam of `vkd_pyro.training.loop.adam`.

    .venv/bin/python benchmarks/bench_svi.py [--rounds 15] [--per-round 10] [--threads 2]
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import cached_batch, machine, median_step_ms, timing_parser, vkd_module  # noqa: E402
from vkd_pyro.training.loop import TrainStep, adam  # noqa: E402

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def log_normal(z, loc, scale):
    """log N(z | loc, diag scale^2), summed over the last dimension."""
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - HALF_LOG_2PI).sum(-1)


def hand_loss(module, batch, beta: float, L: int, M: int) -> torch.Tensor:
    """Minus Eq. 8 averaged over the batch, the Trace_ELBO estimator, in plain PyTorch."""
    model, guide = module.model, module.guide
    x_image = batch.images
    mp, sp = model.prior_net.loc_scale(x_image)
    mq, sq = guide.posterior_net.loc_scale(guide.text_head(batch.token_states, batch.token_mask))
    z_text = mq + sq * torch.randn((L,) + mq.shape)
    z_image = mp + sp * torch.randn((M,) + mp.shape)
    y = batch.labels
    image_logits = model.classifier(torch.cat([z_image, x_image.expand(M, *x_image.shape)], -1))
    image_ll = -F.binary_cross_entropy_with_logits(image_logits, y.expand(image_logits.shape),
                                                   reduction="none").sum(-1).mean(0)
    text_logits = model.text_classifier(z_text)
    text_ll = -F.binary_cross_entropy_with_logits(text_logits, y.expand(text_logits.shape),
                                                  reduction="none").sum(-1).mean(0)
    kl = (log_normal(z_text, mq, sq) - log_normal(z_text, mp, sp)).mean(0)
    return -(image_ll + text_ll - beta * kl).mean()


def pyro_stepper(step: TrainStep, batch, beta: float, validation: bool = False):
    """One training step of a Pyro module (TrainStep), with Pyro's validation on or off."""
    def run():
        with pyro.validation_enabled(validation):
            step(batch, beta, batch.size)
    return run


def hand_stepper(module, optimizer, batch, beta: float, particles: int):
    """One step of the hand-written loss: forward, backward, the gradient norm (TrainStep's NaN watch
    reads it), the optimizer."""
    def run():
        loss = hand_loss(module, batch, beta, particles, particles)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.get_total_norm([p.grad for p in module.parameters()])
        optimizer.step()
    return run


def main() -> None:
    parser = timing_parser(__doc__.split("\n\n")[0], particles_help="L = M values")
    parser.add_argument("--validation", action="store_true", help="also time Pyro with validation on")
    parser.add_argument("--unfused", action="store_true", help="also time both sides with the unfused Adam")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    print(f"machine: {machine()}")
    print("batch 64, z 512, image features 1024, text features 384, MLPs [512, 512], dropout 0.5, Adam")
    header = f"{'L = M':>6} {'Pyro ms':>9} {'Pyro eager ms':>14} {'PyTorch ms':>11} {'ratio':>7} {'ratio eager':>12}"
    if args.validation:
        header += f" {'Pyro+validation ms':>19}"
    if args.unfused:
        header += f" {'Pyro unfused ms':>16} {'PyTorch unfused ms':>19} {'ratio unfused':>14}"
    print(header)
    batch = cached_batch()
    beta = 0.5
    for particles in args.particles:
        module = vkd_module(L=particles, M=particles)
        eager = vkd_module(L=particles, M=particles, eager=True)
        eager.load_state_dict(module.state_dict())
        hand = copy.deepcopy(module)
        module.train(), eager.train(), hand.train()
        step = TrainStep(module, module, adam(module, lr=1e-4))
        eager_step = TrainStep(eager, eager, adam(eager, lr=1e-4))
        hand_optimizer = adam(hand, lr=1e-4)

        steps = {"pyro": pyro_stepper(step, batch, beta), "eager": pyro_stepper(eager_step, batch, beta),
                 "torch": hand_stepper(hand, hand_optimizer, batch, beta, particles)}
        if args.validation:
            steps["validated"] = pyro_stepper(step, batch, beta, validation=True)
        if args.unfused:
            loop_module, loop_hand = copy.deepcopy(module), copy.deepcopy(hand)
            loop_step = TrainStep(loop_module, loop_module, torch.optim.Adam(loop_module.parameters(), lr=1e-4))
            steps["pyro unfused"] = pyro_stepper(loop_step, batch, beta)
            steps["torch unfused"] = hand_stepper(loop_hand, torch.optim.Adam(loop_hand.parameters(), lr=1e-4),
                                                  batch, beta, particles)
        ms = median_step_ms(steps, args.warmup, args.rounds, args.per_round)
        line = (f"{particles:>6} {ms['pyro']:>9.2f} {ms['eager']:>14.2f} {ms['torch']:>11.2f} "
                f"{ms['pyro'] / ms['torch']:>7.3f} {ms['eager'] / ms['torch']:>12.3f}")
        if args.validation:
            line += f" {ms['validated']:>19.2f}"
        if args.unfused:
            line += (f" {ms['pyro unfused']:>16.2f} {ms['torch unfused']:>19.2f} "
                     f"{ms['pyro unfused'] / ms['torch unfused']:>14.3f}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
