"""User mistakes become one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer

from dpft.errors import DpftError

EXIT_USER_ERROR = 2


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DpftError as err:
            print(f"dpft: error: {err}", file=sys.stderr)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            print("dpft: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper
