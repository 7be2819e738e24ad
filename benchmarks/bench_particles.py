"""Vectorised against sequential guide particles: Trace_ELBO(vectorize_particles=True vs False).

The SVI step (forward + backward + Adam, as `vkd_pyro.training.loop.TrainStep` runs it, Pyro's validation
off) of the paper-sized VKD module on cached features (benchmarks/common.py: batch 64, 1024-d image
and 384-d text features, z of 512, MLPs {512, 512}), M = 1 prior sample, L guide particles.
Vectorised, the L particles are one trace with a particle dimension; sequential, L traces one
after the other. "eager" is the vectorised step with pyro's own Normal in place of the families'
BroadcastNormal (vkd_pyro.models.distributions: log densities on the unexpanded parameters).

Target: 16 vectorised particles cost at most 2x one particle.

    .venv/bin/python benchmarks/bench_particles.py [--rounds 15] [--per-round 10] [--threads 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import cached_batch, machine, median_step_ms, timing_parser, vkd_module  # noqa: E402
from vkd_pyro.training.loop import TrainStep, adam  # noqa: E402


def stepper(module, batch):
    step = TrainStep(module, module, adam(module, lr=1e-4))
    module.train()

    def run():
        with pyro.validation_enabled(False):
            step(batch, 0.5, batch.size)
    return run


def main() -> None:
    parser = timing_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    batch = cached_batch()
    print(f"machine: {machine()}")
    print("batch 64, z 512, image features 1024, text features 384, MLPs [512, 512], M = 1, Adam step")
    steps = {}
    for L in args.particles:
        steps[f"vectorised {L}"] = stepper(vkd_module(L=L, M=1), batch)
        steps[f"eager {L}"] = stepper(vkd_module(L=L, M=1, eager=True), batch)
        if L > 1:
            steps[f"sequential {L}"] = stepper(vkd_module(L=L, M=1, vectorize=False), batch)
    ms = median_step_ms(steps, args.warmup, args.rounds, args.per_round)
    one = ms[f"vectorised {args.particles[0]}"]
    print(f"{'L':>4} {'vectorised ms':>14} {'x L=1':>7} {'eager ms':>9} {'x L=1':>7} {'sequential ms':>14} {'x L=1':>7}")
    for L in args.particles:
        seq = ms.get(f"sequential {L}", ms[f"vectorised {L}"] if L == 1 else float("nan"))
        print(f"{L:>4} {ms[f'vectorised {L}']:>14.2f} {ms[f'vectorised {L}'] / one:>7.2f} "
              f"{ms[f'eager {L}']:>9.2f} {ms[f'eager {L}'] / ms[f'eager {args.particles[0]}']:>7.2f} "
              f"{seq:>14.2f} {seq / one:>7.2f}")


if __name__ == "__main__":
    main()
