"""The one exception type users see: a one-line message that names the fix."""


class UserError(Exception):
    """Bad input or environment. The CLI prints ``error: <message>`` and exits with code 2."""
