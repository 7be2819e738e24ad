"""The training loop's record of its steps: the step rate for metrics.json and, when asked for, TensorBoard."""

from __future__ import annotations

import math
import time
from pathlib import Path


class TrainingLogger:
    """Called by the training loop: `step(terms)` after each optimizer step, `epoch(n, values)` after
    each epoch's validation, `close()` at the end (returns the step count and rate for metrics.json).

    With `tensorboard` on, the terms of each step (`terms`: :class:`~vkd_pyro.inference.terms.StepTerms`,
    the objective's terms and beta) go to TensorBoard scalars `step/<term>` against the global step, and each epoch's `values` to
    `epoch/<name>`, in `<out_dir>/tensorboard/`. The step rate counts the time from the previous
    call (step or epoch) to each step, so validation is left out of it; the very first step
    (one-time warm-up: allocations, lazy initialisation) is left out too when there are others.
    """

    def __init__(self, out_dir, tensorboard: bool = False, start_step: int = 0):
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard only when asked for

            self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
        self.global_step = int(start_step)
        self.steps = 0
        self.step_seconds = 0.0
        self.first_step_seconds = None
        self._last = time.perf_counter()

    def step(self, terms) -> None:
        now = time.perf_counter()
        if self.first_step_seconds is None:
            self.first_step_seconds = now - self._last
        else:
            self.step_seconds += now - self._last
        self._last = now
        self.steps += 1
        self.global_step += 1
        if self.writer is not None:
            for name, value in terms.as_dict().items():
                self.writer.add_scalar(f"step/{name}", float(value), self.global_step)

    def epoch(self, epoch: int, values: dict) -> None:
        if self.writer is not None:
            for name, value in values.items():
                if value is not None and math.isfinite(float(value)):
                    self.writer.add_scalar(f"epoch/{name}", float(value), epoch)
            self.writer.flush()
        self._last = time.perf_counter()

    def close(self) -> dict:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.steps > 1:
            rate = (self.steps - 1) / self.step_seconds if self.step_seconds > 0 else None
        else:
            rate = 1.0 / self.first_step_seconds if self.first_step_seconds else None
        return {"train_steps": self.steps, "steps_per_second": rate}
