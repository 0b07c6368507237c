"""The one exception type users see: its message is a single line that says what to do."""


class QvitError(Exception):
    """A user-facing error: bad input, missing file, unsupported option."""
