"""The one base class of the errors a user can fix by changing their input: command-line entry points print such
an error's message alone (no traceback) and exit non-zero; every other exception is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
    """Wrong input, configuration or file, named in the message together with what would be right."""


__all__ = ["UserError"]
