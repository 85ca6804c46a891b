"""UserError: a mistake in what the user asked for (a config value, an input file, a model that
does not fit the data). The command-line entry points print it as one line and exit non-zero;
every other exception is a bug or an environment failure and keeps its traceback.

UserError is a ValueError (a bad value given), InputNotFound also a FileNotFoundError (a path
given that is not there), so callers that catch the builtin kinds keep working."""
from __future__ import annotations


class UserError(ValueError):
    pass


class InputNotFound(UserError, FileNotFoundError):
    """A file or directory the user named does not exist or is not what it should be."""


class ConfigError(UserError):
    """A bad config file, section, key or value (exit code 2)."""
