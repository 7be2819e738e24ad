"""Why a training run stops before its end: a signal (SIGHUP, SIGINT, SIGTERM) or a loss that is not finite.

A run's `SignalFlag` is active from the moment its folder is opened (vkd_pyro.training.loop.fit):
while the folder is claimed and during the training loop a signal is noted, and acted on at the
block's end or at the loop's sync points (the loop writes the resume state and raises `Interrupted`);
anywhere else (preparing the data, encoding the reports, the test report: every write is atomic, so
nothing is lost by stopping there) it raises `Interrupted` at once. A non-finite term is noted during
the step without a host read and raises `TrainingDiverged` naming the step and the term.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch

from vkd_pyro.errors import Interrupted
from vkd_pyro.inference.terms import Term
from vkd_pyro.training import distributed


class SignalFlag:
    """SIGHUP (the terminal closed), SIGINT and SIGTERM while it is active (a context manager).

    Inside `deferred()` a signal is noted in `signum` instead of ending the process, for the block
    to act on (the training loop writes its resume state first); a second SIGINT there (Ctrl-C
    twice) raises KeyboardInterrupt at once. Outside it, a flag made with `interrupted` (signal
    number -> the exception) raises that exception at once, and so does the end of a `deferred()`
    block that noted a signal and did not act on it; a flag without `interrupted` always notes.
    Once a signal has stopped the run, later ones are ignored while it writes how it ended.
    Outside the main thread it does nothing; in a process forked while it raises (a pool of
    workers), a signal ends that process as if no handler were set.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGHUP", "SIGINT", "SIGTERM") if hasattr(signal, name))

    def __init__(self, interrupted: Optional[Callable[[int], Interrupted]] = None):
        self.signum: Optional[int] = None
        self.interrupted = interrupted
        self._noting = interrupted is None
        self._previous: dict = {}
        self._pid = os.getpid()

    def _handle(self, signum, frame) -> None:
        if self._noting:
            if signum == signal.SIGINT and self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signum = signum
        elif os.getpid() != self._pid:  # a forked worker: the default, which ends it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        elif self.signum is None:  # else the run is stopping already
            self.signum = signum
            raise self.interrupted(signum)

    def request(self, signum: int) -> None:
        """Act as if `signum` had arrived (train.stop_after_steps)."""
        self.signum = signum

    @contextmanager
    def deferred(self) -> Iterator["SignalFlag"]:
        """Note signals in `signum` while the block runs; one it noted and did not act on raises
        when it ends (unless it ends with an exception, or the flag only notes)."""
        noting, self._noting = self._noting, True
        try:
            yield self
        finally:
            self._noting = noting
        if self.signum is not None and not noting:
            raise self.interrupted(self.signum)

    def __enter__(self) -> "SignalFlag":
        self._pid = os.getpid()
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
