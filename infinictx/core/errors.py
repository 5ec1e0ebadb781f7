"""One exception type for everything a user can get wrong, and the one check for non-finite numbers.

The CLI turns an `InfinictxError` into a one-line message and exit code 2; anything else is a bug and keeps
its traceback (`--debug`)."""

from __future__ import annotations

from typing import Callable

import torch


class InfinictxError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def check_finite(values: torch.Tensor, message: str | Callable[[], str]):
    """Raise `InfinictxError(message)` unless every value is finite (a NaN loss, an overflowing NLL). `message`
    may be a function, so that a check on a hot path builds no string when all is well."""
    if not bool(torch.isfinite(values).all()):
        raise InfinictxError(message() if callable(message) else message)
