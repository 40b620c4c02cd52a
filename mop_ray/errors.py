"""The one exception type users see: a one-line message saying what was expected and what was found."""


class MopError(Exception):
    """A user-facing error. The CLI prints ``mop-ray: error: <message>`` and exits with status 2."""
