"""The `vkd-pyro` command line (`main`): parse (vkd_pyro.cli.parser), then run the command's handler.

The handler's module (vkd_pyro.cli.commands, vkd_pyro.cli.analysis_commands) is imported after parsing, so that
`--help` and a mistyped option do not wait for torch, Pyro and transformers to load.

A user mistake (a bad config key or value, a missing file, a bad record, a run folder that holds
another run or that another process is writing, a path that cannot be written) prints one line,
`vkd-pyro: error: ...`, and exits with status 2; no traceback. A diverged training (a NaN or infinite
loss term) prints one line and exits with status 3. A training stopped by SIGINT or SIGTERM, at any
point, prints one line with the command that resumes it (`vkd-pyro train --resume DIR`) and exits
with 130 (SIGINT) or 143 (SIGTERM), as a shell would. A write the file system refuses (a full disk,
a quota, a read-only file system) prints one line naming the file and exits with status 2.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional, Sequence

from vkd_pyro.cli.parser import parse
from vkd_pyro.errors import Interrupted, TrainingDiverged, UserError
from vkd_pyro.files import WRITE_REFUSED


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    module, function = args.handler.split(":")
    try:
        getattr(importlib.import_module(module), function)(args)
    except TrainingDiverged as exc:  # its own status: the input was valid, the optimisation failed
        print(f"vkd-pyro: error: {_line(exc)}", file=sys.stderr)
        return 3
    except UserError as exc:
        print(f"vkd-pyro: error: {_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused a path (read-only, full, a file where a folder goes)
        if exc.filename is None and exc.errno not in WRITE_REFUSED:
            raise
        print(f"vkd-pyro: error: {_line(exc)}", file=sys.stderr)
        return 2
    except Interrupted as exc:  # SIGINT/SIGTERM during training: the run says how to go on (exit 130 / 143)
        if os.environ.get("RANK", "0") == "0":  # under torchrun: once, not once per process
            print(f"vkd-pyro: {_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vkd-pyro: interrupted", file=sys.stderr)
        return 130
    return 0


def _line(exc: BaseException) -> str:
    """An error's one line: its message (an OSError: the file, or a write refused without one, and
    what the file system said), then its notes (`__notes__`), separated by '; '."""
    if isinstance(exc, OSError):
        text = f"{exc.filename}: {exc.strerror or type(exc).__name__}" if exc.filename is not None else \
            f"a write failed: {exc.strerror}"
    else:
        text = str(exc)
    return "; ".join([text, *getattr(exc, "__notes__", [])])


if __name__ == "__main__":
    sys.exit(main())
