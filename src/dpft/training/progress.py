"""Training progress: step/total, ε spent (and target), time left. Never a loss: losses are private numbers.

On a terminal a rich bar; elsewhere (`make demo > log`, a pipe, CI) plain lines, so a long run
still says where it is.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

PLAIN_EVERY_S = 30.0  # a log without a TTY gets a line at least this often (while steps come)


class Progress:
    """Show a run's progress; use as a context manager and call `update` after every step.

    Args:
        total: planned steps.
        target_epsilon: the ε the run may spend, shown beside ε so far; None without a target.
        quiet: show nothing.
        label: the line's name (e.g. "train", "DP fine-tune").
        stream: where to write (default stdout); plain lines unless it is a terminal.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        total: int,
        target_epsilon: float | None,
        quiet: bool = False,
        label: str = "train",
        *,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.target, self.label = total, target_epsilon, label
        self._stream = stream if stream is not None else sys.stdout
        self._clock = clock
        console = Console(file=self._stream)
        self._plain = not quiet and not console.is_terminal
        self._bar = None
        if not quiet and not self._plain:
            self._bar = RichProgress(
                TextColumn(f"[bold]{escape(label)}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._bar.add_task("", total=total)
        self._start = 0.0
        self._first: int | None = None  # the step before the first update (a resumed run starts late)
        self._last: tuple[int, float | None] | None = None
        self._printed_at: float | None = None  # time of the last plain line

    def __enter__(self) -> Progress:
        self._start = self._clock()
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self._plain and self._last is not None and self._last[0] < self.total:  # e.g. the budget's stop
            step, epsilon = self._last
            self._line(
                f"step {step}/{self.total}, {self._epsilon(epsilon)}, stopped after {format_duration(self._elapsed())}"
            )

    def update(self, step: int, epsilon: float | None) -> None:
        """After step `step` (1-based) with `epsilon` spent so far (None without DP)."""
        if self._first is None:
            self._first = step - 1
        self._last = (step, epsilon)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, description=self._epsilon(epsilon))
            return
        now = self._clock()
        due = self._printed_at is None or now - self._printed_at >= PLAIN_EVERY_S or step >= self.total
        if self._plain and due:
            self._printed_at = now
            self._line(
                f"step {step}/{self.total} ({step / self.total:.0%}), {self._epsilon(epsilon)}, {self._left(step)}"
            )

    def _epsilon(self, epsilon: float | None) -> str:
        if epsilon is None:
            return "no DP"
        return f"ε {epsilon:.2f}" + (f" of {self.target:g}" if self.target is not None else "")

    def _left(self, step: int) -> str:
        if step >= self.total:
            return f"done in {format_duration(self._elapsed())}"
        per_step = self._elapsed() / max(step - self._first, 1)
        return f"about {format_duration(per_step * (self.total - step))} left"

    def _elapsed(self) -> float:
        return self._clock() - self._start

    def _line(self, text: str) -> None:
        print(f"{self.label}: {text}", file=self._stream, flush=True)


def format_duration(seconds: float) -> str:
    """'45 s', '4 min 10 s', '1 h 05 min': what a person reads in a log."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
