"""The one error type of AutoMedSAM and the one helper that turns a problem into its message.

Every refusal is an :class:`AutoMedSAMError` whose message is one line; the command line prints
it as ``automedsam: error: <message>``. Two kinds, because they are handled differently:

* :class:`RunError` - a problem of the whole run (an option, the weights, the device, the output
  folder): nothing is read or written, the run stops at once. ``SegmentError`` and
  ``CheckpointError`` are its historical names.
* :class:`InputError` - one input cannot be used; the message starts with the file's name. A
  folder run reports it and goes on with the other inputs.
"""

from __future__ import annotations

import os

__all__ = ["AutoMedSAMError", "RunError", "InputError", "SegmentError", "CheckpointError", "one_line",
           "input_error"]


def one_line(text: object) -> str:
    """``text`` (a message or an exception) on one line, runs of whitespace as one space."""
    if isinstance(text, BaseException):
        return " ".join(str(text).split()) or type(text).__name__
    return " ".join(str(text).split())


class AutoMedSAMError(Exception):
    """A refusal with a one-line message."""

    def __init__(self, message: object = ""):
        super().__init__(one_line(message))


class RunError(AutoMedSAMError, ValueError):
    """A problem of the run (options, weights, device, output folder): stops everything, before any work."""


class CheckpointError(RunError, RuntimeError):
    """A weights or checkpoint file is missing, unreadable, unsafe or does not fit the model."""


class InputError(AutoMedSAMError, ValueError):
    """An input (or label) file that cannot be used; the message is one line naming the file."""


SegmentError = RunError  # the name ``automedsam.segment`` has always raised


def input_error(path: str | os.PathLike, problem: object) -> InputError:
    """The :class:`InputError` for ``path``: ``"<path>: <problem>"`` on one line."""
    return InputError(f"{path}: {one_line(problem)}")
