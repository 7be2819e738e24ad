"""Why a training run stops before its end: a signal (SIGINT, SIGTERM) or a loss that is not finite.

Both are noted during the step without a host read and acted on at the loop's sync points
(vkd_pyro.training.loop): a signal writes the resume state and raises `Interrupted`; a non-finite term
raises `TrainingDiverged` naming the step and the term.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional, Sequence

import torch

from vkd_pyro.inference.terms import Term
from vkd_pyro.training import distributed


class SignalFlag:
    """While active (a context manager), SIGINT and SIGTERM are noted in `signum` instead of ending
    the process, so that the training loop can write its resume state first. A second SIGINT
    (Ctrl-C twice) raises KeyboardInterrupt at once. Outside the main thread it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def request(self, signum: int) -> None:
        """Act as if `signum` had arrived (train.stop_after_steps)."""
        self.signum = signum

    def __enter__(self) -> "SignalFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class FiniteWatch:
    """Remembers, on the device (no host read per step), the first step at which a loss term or
    the gradient norm was NaN or infinite, and which of them; `read()` brings it to the host."""

    def __init__(self, device: torch.device, terms: Sequence[Term], global_step: int = 0):
        self.names = [t.name for t in terms] + ["gradient norm"]
        self.step = torch.full((), int(global_step), dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad = torch.zeros(len(self.names), dtype=torch.bool, device=device)

    def observe(self, terms: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.step += 1
        not_finite = ~torch.isfinite(torch.cat([terms, grad_norm.reshape(1).to(terms.dtype)]))
        new = not_finite.any() & (self.first_bad < 0)
        self.first_bad = torch.where(new, self.step, self.first_bad)
        self.bad = torch.where(new, not_finite, self.bad)

    def read(self) -> Optional[tuple[int, list[str]]]:
        """(global step, names of the non-finite terms) of the first bad step, or None."""
        values = torch.cat([self.first_bad.reshape(1), self.bad.long()]).tolist()
        if values[0] < 0:
            return None
        return values[0], [name for name, bad in zip(self.names, values[1:]) if bad]


def agreed_signal(stop: SignalFlag, device: torch.device, ctx: distributed.DistContext) -> Optional[int]:
    """The signal that stops the run: this process's, or with several processes the largest any
    received (all stop at the same step)."""
    if not ctx.enabled:
        return stop.signum
    flag = torch.tensor([stop.signum or 0], device=device)
    value = int(distributed.all_reduce_(flag, "max").item())
    return value or None
