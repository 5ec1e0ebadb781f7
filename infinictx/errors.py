"""One exception type for everything a user can get wrong.

The CLI turns an `InfinictxError` into a one-line message and exit code 2; anything else is a bug and keeps
its traceback (`--debug`)."""


class InfinictxError(Exception):
    """A problem with the user's input or environment, explained in one line."""
