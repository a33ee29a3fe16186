"""The one exception root. The CLI turns any DpftError into a one-line message and exit code 2."""

from __future__ import annotations


class DpftError(Exception):
    """A user-facing error: bad input, bad configuration, or a refused operation."""


class DataError(DpftError):
    """A problem in a data file, located by file, line and field.

    The message never quotes the record's text: training data must not leak into logs.
    """

    def __init__(self, path: str, line: int | None, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = path, line, field, problem
        where = path if line is None else f"{path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{problem}")


class ConfigError(DpftError):
    """One or more invalid settings, all reported at once in the user's words (flag names)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class CheckpointError(DpftError):
    """A checkpoint that is missing, corrupted, tampered with, or from another run."""


class BudgetExceededError(DpftError):
    """A run that would spend more privacy budget than allowed."""
