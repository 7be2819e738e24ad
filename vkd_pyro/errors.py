"""User-facing errors: the CLI prints their message on one line and exits with status 2 (3 for
TrainingDiverged, so that scripts can tell a diverged run from a bad input)."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, bad record); no traceback is shown."""


class ConfigError(UserError):
    """A config file or override names an unknown key, has a wrong type or an out-of-range value."""


class DataError(UserError):
    """A dataset file is missing or a record cannot be read."""


class TrainingDiverged(UserError):
    """A loss term or the gradient norm became NaN or infinite; the last good checkpoint is kept.

    A UserError (one line, no traceback; a sweep reports it and goes on), with its own exit status 3."""


class Interrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after writing its resume state (last.pt).

    The CLI prints the message (one line, with the command that resumes) and exits with the shell's
    status for the signal, 128 + signal number: 130 for SIGINT, 143 for SIGTERM.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
