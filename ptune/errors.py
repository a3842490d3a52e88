"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class PtuneError(Exception):
    """A problem the user can fix (bad config value, missing file, incompatible checkpoint)."""
