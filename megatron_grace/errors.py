"""Errors raised on bad input.

Every user-facing problem (a missing or corrupt file, a wrong schema, ids out of range, a
plan that does not fit its topology) raises :class:`GraceInputError`. Its message is one line
that names the offending file (when there is one) and the problem, so that the CLI can print
it as-is and exit with code 2. Input that is accepted but looks implausible gives a
:class:`GraceInputWarning` instead.
"""

from __future__ import annotations

import os


class GraceInputError(ValueError):
    """Bad input: the message names the source (file) and what is wrong with it."""

    def __init__(self, problem: str, source: str | os.PathLike[str] | None = None) -> None:
        self.problem = problem
        self.source = None if source is None else str(source)
        message = problem if self.source is None else f"{self.source}: {problem}"
        super().__init__(message.replace("\n", " "))


class GraceInputWarning(UserWarning):
    """Input that is read but looks implausible (the CLI prints it as one ``warning:`` line)."""


class ContradictionWarning(GraceInputWarning):
    """Inputs that contradict each other (a model shape of 128 experts for an 8-expert trace): the
    library warns and goes on with what it was told; the CLI refuses with exit code 2."""
