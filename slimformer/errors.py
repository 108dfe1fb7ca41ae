"""User-facing errors.

Anything a user can cause (bad name, bad path, bad recipe value, corrupt file) raises
:class:`SlimformerError` with a one-line message that names the problem. The CLI prints
that line and exits non-zero; tracebacks are shown only with ``--debug``.
"""


class SlimformerError(Exception):
    """An error caused by user input or a bad file; its message is one line for a person."""


class ConfigError(SlimformerError, ValueError):
    """A config/recipe field has an invalid value. The message names the field."""
