"""User-facing errors: the CLI prints their message on one line and exits with status 2."""


class UserError(Exception):
    """A mistake the user can fix (bad config, missing file, bad record); no traceback is shown."""


class ConfigError(UserError):
    """A config file or override names an unknown key, has a wrong type or an out-of-range value."""


class DataError(UserError):
    """A dataset file is missing or a record cannot be read."""
