"""The `vkd-pyro` command line (`main`): parse (vkd_pyro.cli.parser), then run the command's handler.

The handler's module (vkd_pyro.cli.commands, vkd_pyro.cli.analysis_commands) is imported after parsing, so that
`--help` and a mistyped option do not wait for torch, Pyro and transformers to load.

A user mistake (a bad config key or value, a missing file, a bad record, a run folder that holds
another run or that another process is writing, a path that cannot be written) prints one line,
`vkd-pyro: error: ...`, and exits with status 2; no traceback. A diverged training (a NaN or infinite
loss term) prints one line and exits with status 3. A training stopped by SIGINT or SIGTERM writes
its resume state, prints one line with the command that resumes it (`vkd-pyro train --resume DIR`)
and exits with 130 (SIGINT) or 143 (SIGTERM), as a shell would.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional, Sequence

from vkd_pyro.cli.parser import parse
from vkd_pyro.errors import Interrupted, TrainingDiverged, UserError


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    module, function = args.handler.split(":")
    try:
        getattr(importlib.import_module(module), function)(args)
    except TrainingDiverged as exc:  # its own status: the input was valid, the optimisation failed
        print(f"vkd-pyro: error: {exc}", file=sys.stderr)
        return 3
    except UserError as exc:
        print(f"vkd-pyro: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused a path (read-only, full, a file where a folder goes)
        if exc.filename is None:
            raise
        print(f"vkd-pyro: error: {exc.filename}: {exc.strerror or type(exc).__name__}", file=sys.stderr)
        return 2
    except Interrupted as exc:  # SIGINT/SIGTERM during training: last.pt written (exit 130 / 143)
        if os.environ.get("RANK", "0") == "0":  # under torchrun: once, not once per process
            print(f"vkd-pyro: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vkd-pyro: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
