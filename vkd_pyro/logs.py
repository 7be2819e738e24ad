"""The project's log: `logging` under the name "vkd_pyro", to the console and to a run's run.log.

Status lines (what the data is, each epoch, where files went) are log records at level INFO. The
console handler prints the bare message to the current standard output (so `print`-style output and
test capture keep working); `run_log(folder)` adds `<folder>/run.log` with a time stamp and level on
each line for as long as a run writes that folder. A command's own result (a table, JSON) is
printed, not logged.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOGGER = logging.getLogger("vkd_pyro")


class _CurrentStdout(logging.StreamHandler):
    """A StreamHandler on whatever sys.stdout is when a record is emitted."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the property always reads sys.stdout
        pass


def _console() -> logging.Logger:
    if not any(isinstance(h, _CurrentStdout) for h in LOGGER.handlers):
        handler = _CurrentStdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
        LOGGER.setLevel(logging.INFO)
        LOGGER.propagate = False
    return LOGGER


def info(message: str) -> None:
    _console().info(message)
    for handler in LOGGER.handlers:
        handler.flush()


def warning(message: str) -> None:
    _console().warning(message)


class _RunLogFile(logging.FileHandler):
    """run.log: a record it cannot write (a full disk) stops the file, not the run. The first failure
    prints one line naming the file to standard error (instead of logging's traceback) and removes the
    handler; the console goes on, and a failed checkpoint write fails the run in its own words."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        LOGGER.removeHandler(self)
        print(f"vkd-pyro: warning: {self.baseFilename}: could not be written ({error.strerror or error}); "
              "the log goes on on the console only", file=sys.stderr, flush=True)


@contextmanager
def run_log(folder: Path) -> Iterator[Path]:
    """Append every record to `<folder>/run.log` while the block runs."""
    path = Path(folder) / "run.log"
    handler = _RunLogFile(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    _console().addHandler(handler)
    try:
        yield path
    finally:
        LOGGER.removeHandler(handler)
        handler.close()
