"""JIT-compiled ELBO estimators: `inference.elbo: jit_trace | jit_meanfield`.

Pyro's own `JitTrace_ELBO` and `JitTraceMeanField_ELBO` do not work with this program as they are:

- they give `torch.jit.trace` the parameters of Pyro's param store as inputs; the model and guide
  here are `nn.Module`s whose weights are not in it, and tracing stops with "Cannot insert a Tensor
  that requires grad as a constant" (registering them with `pyro.module` would copy channels-last
  weights and unfreeze frozen ones);
- they compile once per distinct keyword argument, so a float `kl_weight` recompiles at every new
  beta of the annealing schedule, and the first beta = 0 of Eq. 9 would freeze the masked branch;
- a traced function runs its Python side effects only while it is traced, so the per-term sums of
  :class:`vkd_pyro.objective.TermRecorder` would stay those of the first batch.

:class:`CompiledELBO` compiles instead, with `torch.jit.trace`, a function that returns the loss and
the term sums together, and whose inputs are the model's and guide's parameters and buffers (the
very tensors of the modules, so gradients and in-place buffer updates reach them), the batch, and
kl_weight as a 0-d tensor (always `poutine.scale`, never the mask: see `schedules.kl_weighted`). It
compiles once per (model, guide, their train/eval modes, which inputs are present, their shapes,
dtypes and device): Pyro's plates bake the batch size into the graph, so a last short batch and
each report length (with `LengthBucketSampler`) is one more compilation. The randomness is the
graph's own (fresh draws at every call, from torch's generator, in the same order as eagerly).
"""

from __future__ import annotations

import warnings

import pyro
import torch
from torch import nn

SUM_NAMES = ("image_log_lik", "text_labels", "kl")
INPUT_NAMES = ("images", "token_states", "token_mask", "labels", "label_mask", "kl_weight")


class CompiledELBO:
    """A :class:`~vkd_pyro.objective.TermRecorder` ELBO whose loss and sums are computed by a traced graph.

    The interface of the recorder: `differentiable_loss(model, guide, images, token_states,
    token_mask, labels=..., label_mask=..., kl_weight=...)` returns the loss and leaves the sums of
    this batch in `self.sums` (0-d tensors).
    """

    def __init__(self, elbo):
        self.elbo = elbo
        self.num_particles = elbo.num_particles
        self.sums: dict = {}
        self.compiled: dict = {}  # key -> torch.jit.ScriptFunction

    def differentiable_loss(self, model: nn.Module, guide: nn.Module, images, token_states=None, token_mask=None,
                            labels=None, label_mask=None, kl_weight=1.0) -> torch.Tensor:
        if labels is None:
            raise ValueError("the ELBO needs labels")
        if float(kl_weight) < 0:
            raise ValueError(f"the KL weight must be >= 0, got {float(kl_weight)}")
        beta = torch.as_tensor(float(kl_weight), dtype=labels.dtype, device=labels.device)
        batch = (images, token_states, token_mask, labels, label_mask, beta)
        present = tuple(x is not None for x in batch)
        tensors = tuple(x for x in batch if x is not None)
        state = _state_tensors(model) + _state_tensors(guide)
        key = (id(model), id(guide), model.training, guide.training, present,
               tuple((tuple(t.shape), t.dtype, t.device) for t in tensors + state))
        if key not in self.compiled:
            self.compiled[key] = self._compile(model, guide, present, len(state), state + tensors)
        loss, sums = self.compiled[key](*state, *tensors)
        self.sums = dict(zip(SUM_NAMES, sums.unbind(0)))
        return loss

    def _compile(self, model, guide, present, num_state, inputs):
        def loss_and_sums(*inputs):
            values = iter(inputs[num_state:])  # the module tensors are read through the modules
            images, states, mask, labels, label_mask, beta = (next(values) if p else None for p in present)
            loss = self.elbo.differentiable_loss(model, guide, images, states, mask, labels=labels,
                                                 label_mask=label_mask, kl_weight=beta)
            zero = loss.new_zeros(())
            sums = [self.elbo.sums.get(name) for name in SUM_NAMES]
            return loss, torch.stack([s.to(zero) if torch.is_tensor(s) else zero for s in sums])

        with warnings.catch_warnings(), pyro.validation_enabled(False):
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*jit.*")
            return torch.jit.trace(loss_and_sums, inputs, check_trace=False)


def _state_tensors(module: nn.Module) -> tuple:
    """The parameters and buffers of `module` (graph inputs: the tracer follows them by identity)."""
    return tuple(module.parameters()) + tuple(b for b in module.buffers() if b is not None)
