"""Progress bar: step and ε spent / target. Public numbers only: never a loss, never text."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, total: int, target_epsilon: float | None, quiet: bool = False):
        self.target = target_epsilon
        self.quiet = quiet
        self._bar = RichProgress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=quiet,
            transient=False,
        )
        self._task = self._bar.add_task("", total=total)

    def __enter__(self) -> Progress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.__exit__(*exc)

    def update(self, step: int, epsilon: float | None) -> None:
        budget = "" if epsilon is None else f"ε {epsilon:.2f}" + (f"/{self.target:g}" if self.target else "")
        self._bar.update(self._task, completed=step, description=budget)
