"""`dpft train`: its flags are derived from `TrainConfig` (one source of truth for CLI, YAML and config.yaml)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

import typer

from dpft.cli.errors import handles_errors
from dpft.errors import ConfigError
from dpft.training.config import RUN_ONLY, TrainConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parameters() -> list[inspect.Parameter]:
    hints = typing.get_type_hints(TrainConfig)
    params = [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Path | None,
            default=typer.Option(None, "--config", help="YAML file of options; flags given on the command line win."),
        ),
        inspect.Parameter(
            "json_out",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(False, "--json", help="Print privacy.json to stdout at the end."),
        ),
    ]
    for f in dataclasses.fields(TrainConfig):
        option = typer.Option(f.default, _flag(f.name), help=f.metadata["help"])
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name], default=option)
        )
    return params


def _resolve(ctx: typer.Context, config_file: Path | None, values: dict[str, Any]) -> TrainConfig:
    """YAML values first, then every flag the user actually typed; --resume takes no other setting."""
    # typer vendors its own click: compare the source by name, not by enum identity
    typed = {k: v for k, v in values.items() if getattr(ctx.get_parameter_source(k), "name", None) != "DEFAULT"}
    if values.get("resume") is not None:
        ignored = [_flag(k) for k in typed if k not in RUN_ONLY] + (["--config"] if config_file else [])
        if ignored:
            raise ConfigError([f"--resume continues a run with its saved settings; remove {', '.join(ignored)}"])
    if config_file is None:
        return TrainConfig(**values)
    base = dataclasses.asdict(TrainConfig.load(config_file))
    return TrainConfig(**{**base, **typed})


@handles_errors
def train_command(ctx: typer.Context, config: Path | None = None, json_out: bool = False, **values: Any) -> None:
    """Fine-tune a causal LM with DP-SGD (LoRA by default) and write a run directory."""
    from dpft.training.recipe import train

    cfg = _resolve(ctx, config, values)
    if cfg.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ:  # not yet inside torchrun: launch it
        from dpft.training.distributed import launch

        raise typer.Exit(launch(cfg.nproc_per_node, _launch_args(ctx, config, json_out, values)))
    report = train(cfg)
    if os.environ.get("RANK", "0") == "0":  # data-parallel: rank 0 alone reports
        if json_out:
            print(json.dumps(report, indent=2))
        else:
            _summary(report, cfg.resume or cfg.output)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_worker()


def _exit_worker() -> None:
    """End a torchrun worker now that the run is written: skip interpreter finalization.

    Gloo keeps C++ worker threads and work objects whose teardown during finalization can abort a
    process that finished its job ("terminate called without an active exception": twice in the
    2-process CLI tests on a loaded machine), and torchrun then reports the whole run failed.
    Every file of the run is written and fsynced and the process group destroyed by now.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _launch_args(ctx: typer.Context, config: Path | None, json_out: bool, values: dict[str, Any]) -> list[str]:
    """The `dpft train` arguments as typed (each rank re-resolves them the same way)."""
    args = (["--config", str(config)] if config else []) + (["--json"] if json_out else [])
    for name, value in values.items():
        if getattr(ctx.get_parameter_source(name), "name", None) == "DEFAULT" or value is None:
            continue
        if isinstance(value, bool):
            args += [_flag(name)] if value else []
        else:
            args += [_flag(name), str(value)]
    return args


def _summary(report: dict[str, Any], output: str) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    if report["dp"] and report["epsilon"] is not None:
        console.print(
            f"[green]done[/]: ({report['epsilon']:.3f}, {report['delta']:g})-DP per {report['privacy_unit']}, "
            f"{report['steps']} steps, σ = {report['noise_multiplier']:.3f} → {output}"
        )
    elif report["dp"]:
        console.print(f"[red]guarantee withheld[/]: {report.get('guarantee_refused')} → {output}")
    else:
        console.print(f"[yellow]done without DP[/] (no privacy guarantee), {report['steps']} steps → {output}")
    console.print(f"stop: {report['stop_reason']}; data statistics and losses: {output}/private/ (keep with the data)")


train_command.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]
train_command.__annotations__ = {p.name: p.annotation for p in _parameters()}
