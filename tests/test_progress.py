"""Progress without a terminal: plain lines a log can show (steps, ε, time left), never a loss."""

from __future__ import annotations

import io

from dpft.training.progress import PLAIN_EVERY_S, Progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(steps: int, total: int, seconds_per_step: float, target: float | None = 8.0) -> list[str]:
    out, clock = io.StringIO(), FakeClock()
    with Progress(total, target, label="DP fine-tune", stream=out, clock=clock) as progress:
        for step in range(1, steps + 1):
            clock.now += seconds_per_step
            progress.update(step, None if target is None else 0.1 * step)
    return out.getvalue().splitlines()


def test_a_line_at_the_first_step_every_30_s_and_the_end():
    lines = run(steps=40, total=40, seconds_per_step=5.0)  # 200 s of fake time
    steps = [int(line.split("step ")[1].split("/")[0]) for line in lines]
    assert steps == [1, 7, 13, 19, 25, 31, 37, 40]  # the first step, then every 6 steps × 5 s = 30 s, the end
    assert PLAIN_EVERY_S == 30.0
    assert lines[0] == "DP fine-tune: step 1/40 (2%), ε 0.10 of 8, about 3 min 15 s left"
    assert lines[1].startswith("DP fine-tune: step 7/40 (18%), ε 0.70 of 8, about 2 min 45 s left")
    assert lines[-1] == "DP fine-tune: step 40/40 (100%), ε 4.00 of 8, done in 3 min 20 s"
    assert not any("loss" in line for line in lines)


def test_slow_steps_print_every_step_and_an_early_stop_says_so():
    lines = run(steps=3, total=10, seconds_per_step=45.0, target=None)
    assert [line.split(",")[0] for line in lines] == [
        "DP fine-tune: step 1/10 (10%)",
        "DP fine-tune: step 2/10 (20%)",
        "DP fine-tune: step 3/10 (30%)",
        "DP fine-tune: step 3/10",
    ]
    assert lines[0].endswith("no DP, about 6 min 45 s left")
    assert lines[-1].endswith("stopped after 2 min 15 s")


def test_quiet_prints_nothing():
    out = io.StringIO()
    with Progress(5, 8.0, quiet=True, stream=out) as progress:
        progress.update(1, 0.5)
    assert out.getvalue() == ""


def test_a_terminal_gets_the_rich_bar_with_epsilon_and_no_loss():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    with Progress(4, 8.0, stream=out) as progress:
        for step in range(1, 5):
            progress.update(step, 0.5 * step)
    shown = out.getvalue()
    assert "4/4" in shown and "ε 2.00 of 8" in shown and "loss" not in shown
