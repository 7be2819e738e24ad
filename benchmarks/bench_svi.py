"""The VKD SVI step in Pyro against the same loss written by hand in plain PyTorch, side by side.

Both sides: batch 64, 1024-d image and 384-d text features as cached inputs (benchmarks/common.py),
z of 512, MLPs {512, 512} with dropout 0.5, both classifiers, L = M in {1, 4, 16}; one step =
forward + backward + the gradient norm + Adam. The networks are identical (each other column runs
a copy of the Pyro column's weights, with its own optimizer).

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

`--bare` adds "bare Trace_ELBO": the same model and guide (`module.model`, `module.guide`) stepped
with Pyro's plain `Trace_ELBO(num_particles=L, vectorize_particles=L > 1, max_plate_nesting=1)
.differentiable_loss` on `module.batch_args(batch, beta)`, divided by the batch size, then the same
zero_grad, backward, gradient norm and Adam, with Pyro's validation off: no term record, no
VKDModule.forward, no TrainStep. Columns `bare ms`, `Pyro/bare` (what vkd-pyro adds on top of Pyro:
the term record, the module and the training step; the median over rounds of the ratio of the two
steps timed back to back in the same round, with its 95% bootstrap interval over the rounds) and
`bare/PyTorch` (what Pyro itself costs over the hand-written loss); Pyro/PyTorch is about
Pyro/bare x bare/PyTorch.

`--whole-step` times, instead of the table, the demo configuration's whole training step, image and
text encoders included, on synthetic inputs of the demo's shapes: the module that
`build_module(load_config("configs/demo.yaml"), dims)` builds (dims: all-MiniLM-L6-v2's 384-wide
block sizes; small CNN on 64 x 64 images, the 128-wide text block over 384-d token states, diagonal
Gaussian prior and posterior) through `TrainStep`, against the hand-written loss on an identical
copy of its networks that computes its features through `model.image_encoder(images)` and
`guide.text_head(token_states, token_mask)`. The batch: the demo's batch size, images uniform in
[0, 1], float16 token states of 69 tokens (the demo's mean report length), all real, labels
Bernoulli(0.2). L and M are the demo's (`inference.num_particles`, `inference.prior_samples`);
`--particles` does not apply. With `--bare` the line also has the bare Trace_ELBO columns.

    .venv/bin/python benchmarks/bench_svi.py [--rounds 15] [--per-round 10] [--threads 2] [--bare]
    .venv/bin/python benchmarks/bench_svi.py --whole-step [--bare] [--rounds 15] [--per-round 10]
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyro  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pyro.infer import Trace_ELBO  # noqa: E402

from benchmarks.common import (  # noqa: E402
    cached_batch,
    machine,
    medians,
    paired_ratio,
    step_times,
    timing_parser,
    vkd_module,
)
from vkd_pyro.classes import NUM_CLASSES  # noqa: E402
from vkd_pyro.config import load_config  # noqa: E402
from vkd_pyro.data.batching import Batch  # noqa: E402
from vkd_pyro.training.build import build_module  # noqa: E402
from vkd_pyro.training.loop import TrainStep, adam  # noqa: E402

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
DEMO_TEXT_DIMS = {"hidden_size": 384, "num_heads": 12, "intermediate_size": 1536}  # all-MiniLM-L6-v2 (text_dims)
DEMO_TOKENS = 69  # the demo's mean report length in tokens


def log_normal(z, loc, scale):
    """log N(z | loc, diag scale^2), summed over the last dimension."""
    return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - HALF_LOG_2PI).sum(-1)


def hand_loss_on(model, guide, x_image, x_text, labels, beta: float, L: int, M: int) -> torch.Tensor:
    """Minus Eq. 8 averaged over the batch, the Trace_ELBO estimator, in plain PyTorch, on image
    features x_image (B, F) and pooled text features x_text (B, H)."""
    mp, sp = model.prior_net.loc_scale(x_image)
    mq, sq = guide.posterior_net.loc_scale(x_text)
    z_text = mq + sq * torch.randn((L,) + mq.shape)
    z_image = mp + sp * torch.randn((M,) + mp.shape)
    y = labels
    image_logits = model.classifier(torch.cat([z_image, x_image.expand(M, *x_image.shape)], -1))
    image_ll = -F.binary_cross_entropy_with_logits(image_logits, y.expand(image_logits.shape),
                                                   reduction="none").sum(-1).mean(0)
    text_logits = model.text_classifier(z_text)
    text_ll = -F.binary_cross_entropy_with_logits(text_logits, y.expand(text_logits.shape),
                                                  reduction="none").sum(-1).mean(0)
    kl = (log_normal(z_text, mq, sq) - log_normal(z_text, mp, sp)).mean(0)
    return -(image_ll + text_ll - beta * kl).mean()


def hand_loss(module, batch, beta: float, L: int, M: int) -> torch.Tensor:
    """The hand-written loss on cached features: the batch's images are the image features."""
    model, guide = module.model, module.guide
    return hand_loss_on(model, guide, batch.images, guide.text_head(batch.token_states, batch.token_mask),
                        batch.labels, beta, L, M)


def whole_hand_loss(module, batch, beta: float, L: int, M: int) -> torch.Tensor:
    """The hand-written loss of the whole step: features through the image encoder and the text head."""
    model, guide = module.model, module.guide
    return hand_loss_on(model, guide, model.image_encoder(batch.images),
                        guide.text_head(batch.token_states, batch.token_mask), batch.labels, beta, L, M)


def pyro_stepper(step: TrainStep, batch, beta: float, validation: bool = False):
    """One training step of a Pyro module (TrainStep), with Pyro's validation on or off."""
    def run():
        with pyro.validation_enabled(validation):
            step(batch, beta, batch.size)
    return run


def grad_norm(params) -> torch.Tensor:
    """The gradient norm TrainStep's NaN watch reads (over the parameters that have a gradient)."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def hand_stepper(module, optimizer, batch, beta: float, particles: int, prior_samples: int | None = None,
                 loss=hand_loss):
    """One step of the hand-written loss: forward, backward, the gradient norm, the optimizer."""
    params = list(module.parameters())
    M = particles if prior_samples is None else prior_samples

    def run():
        value = loss(module, batch, beta, particles, M)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        grad_norm(params)
        optimizer.step()
    return run


def bare_stepper(module, optimizer, batch, beta: float, particles: int):
    """One step of the module's model and guide with Pyro's plain Trace_ELBO (no term record, no
    VKDModule.forward, no TrainStep): the loss over the batch size, backward, the gradient norm, the
    optimizer, with Pyro's validation off."""
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1)
    params = [p for p in module.parameters() if p.requires_grad]

    def run():
        with pyro.validation_enabled(False):
            args, kwargs = module.batch_args(batch, beta)
            loss = elbo.differentiable_loss(module.model, module.guide, *args, **kwargs) / batch.size
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm(params)
            optimizer.step()
    return run


BARE_HEADER = f" {'bare ms':>8} {'Pyro/bare [95% CI]':>24} {'bare/PyTorch':>13}"


def bare_columns(times: dict) -> str:
    """bare ms, vkd-pyro's share (Pyro/bare: the median of the per-round ratios, paired rounds, with
    its bootstrap interval) and Pyro's (bare/PyTorch, the ratio of the medians)."""
    ms = medians(times)
    share, low, high = paired_ratio(times["pyro"], times["bare"])
    interval = f"{share:.3f} [{low:.3f}, {high:.3f}]"
    return f" {ms['bare']:>8.2f} {interval:>24} {ms['bare'] / ms['torch']:>13.3f}"


def demo_batch(config, tokens: int = DEMO_TOKENS, width: int = DEMO_TEXT_DIMS["hidden_size"],
               seed: int = 0) -> Batch:
    """A synthetic batch of the demo's shapes: images (B, 1, S, S) uniform in [0, 1], float16 token
    states (B, tokens, width), all of them real, labels Bernoulli(0.2)."""
    g = torch.Generator().manual_seed(seed)
    B, size = config.train.batch_size, config.data.image_size
    return Batch(images=torch.rand(B, 1, size, size, generator=g),
                 labels=(torch.rand(B, NUM_CLASSES, generator=g) < 0.2).float(),
                 index=torch.arange(B),
                 token_states=torch.randn(B, tokens, width, generator=g).to(torch.float16),
                 token_mask=torch.ones(B, tokens, dtype=torch.bool))


def whole_step(args) -> None:
    """The demo configuration's whole training step, Pyro (TrainStep) against the hand-written loss."""
    config = load_config(DEMO_CONFIG)
    inf, m, enc, text = config.inference, config.model, config.image_encoder, config.text_encoder
    if inf.objective != "vkd" or inf.elbo != "trace" or m.prior != "diagonal" or m.guide != "diagonal":
        raise SystemExit(f"{DEMO_CONFIG}: the hand-written loss is objective vkd, elbo trace, diagonal prior "
                         f"and guide; the config has {inf.objective}, {inf.elbo}, {m.prior}, {m.guide}")
    L, M = inf.num_particles, inf.prior_samples

    def build():
        return build_module(config, DEMO_TEXT_DIMS)

    module = build()
    # copies by state dict into freshly built modules (not deepcopy): a module whose forward
    # train.amp has wrapped would keep calling the original's networks after a deepcopy
    twins = {name: build() for name in (["torch", "bare"] if args.bare else ["torch"])}
    for twin in twins.values():
        twin.load_state_dict(module.state_dict())
    for net in (module, *twins.values()):
        net.train()
    batch = demo_batch(config)
    beta = 0.5
    steps = {"pyro": pyro_stepper(TrainStep(module, module, adam(module, lr=config.train.lr)), batch, beta),
             "torch": hand_stepper(twins["torch"], adam(twins["torch"], lr=config.train.lr), batch, beta, L, M,
                                   loss=whole_hand_loss)}
    if args.bare:
        steps["bare"] = bare_stepper(twins["bare"], adam(twins["bare"], lr=config.train.lr), batch, beta, L)
    print(f"{DEMO_CONFIG.relative_to(ROOT)}: {enc.name} (width {enc.width}, {enc.out_features} features) on "
          f"{config.data.image_size} x {config.data.image_size} images; text block {text.block_width} wide "
          f"({text.block_heads} heads, ffn {text.block_ffn}) over {DEMO_TOKENS} float16 token states of "
          f"{DEMO_TEXT_DIMS['hidden_size']}; z {m.z_dim}, MLPs {list(m.hidden)}, dropout {m.dropout}; "
          f"batch {batch.size}, Adam")
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    print(f"{trainable:,} trainable parameters")
    label = f"whole demo step (L = M = {L})" if L == M else f"whole demo step (L = {L}, M = {M})"
    header = f"{'':<{len(label)}} {'Pyro ms':>9} {'PyTorch ms':>11} {'ratio':>7}"
    print(header + (BARE_HEADER if args.bare else ""))
    times = step_times(steps, args.warmup, args.rounds, args.per_round)
    ms = medians(times)
    line = f"{label} {ms['pyro']:>9.2f} {ms['torch']:>11.2f} {ms['pyro'] / ms['torch']:>7.3f}"
    print(line + (bare_columns(times) if args.bare else ""), flush=True)


def main() -> None:
    parser = timing_parser(__doc__.split("\n\n")[0], particles_help="L = M values")
    parser.add_argument("--validation", action="store_true", help="also time Pyro with validation on")
    parser.add_argument("--unfused", action="store_true", help="also time both sides with the unfused Adam")
    parser.add_argument("--bare", action="store_true",
                        help="also time the model and guide with Pyro's plain Trace_ELBO (no term record)")
    parser.add_argument("--whole-step", action="store_true",
                        help="instead of the table: the whole training step of configs/demo.yaml, encoders included")
    args = parser.parse_args()
    if args.whole_step and (args.validation or args.unfused):
        parser.error("--whole-step takes --bare but not --validation or --unfused")
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    print(f"machine: {machine()}")
    if args.whole_step:
        whole_step(args)
        return
    print("batch 64, z 512, image features 1024, text features 384, MLPs [512, 512], dropout 0.5, Adam")
    header = f"{'L = M':>6} {'Pyro ms':>9} {'Pyro eager ms':>14} {'PyTorch ms':>11} {'ratio':>7} {'ratio eager':>12}"
    if args.bare:
        header += BARE_HEADER
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
        if args.bare:
            bare = copy.deepcopy(module)
            steps["bare"] = bare_stepper(bare, adam(bare, lr=1e-4), batch, beta, particles)
        if args.validation:
            steps["validated"] = pyro_stepper(step, batch, beta, validation=True)
        if args.unfused:
            loop_module, loop_hand = copy.deepcopy(module), copy.deepcopy(hand)
            loop_step = TrainStep(loop_module, loop_module, torch.optim.Adam(loop_module.parameters(), lr=1e-4))
            steps["pyro unfused"] = pyro_stepper(loop_step, batch, beta)
            steps["torch unfused"] = hand_stepper(loop_hand, torch.optim.Adam(loop_hand.parameters(), lr=1e-4),
                                                  batch, beta, particles)
        times = step_times(steps, args.warmup, args.rounds, args.per_round)
        ms = medians(times)
        line = (f"{particles:>6} {ms['pyro']:>9.2f} {ms['eager']:>14.2f} {ms['torch']:>11.2f} "
                f"{ms['pyro'] / ms['torch']:>7.3f} {ms['eager'] / ms['torch']:>12.3f}")
        if args.bare:
            line += bare_columns(times)
        if args.validation:
            line += f" {ms['validated']:>19.2f}"
        if args.unfused:
            line += (f" {ms['pyro unfused']:>16.2f} {ms['torch unfused']:>19.2f} "
                     f"{ms['pyro unfused'] / ms['torch unfused']:>14.3f}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
