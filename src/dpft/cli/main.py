"""The `dpft` command line: train, generate, evaluate, audit, account, data, ledger, demo."""

from __future__ import annotations

import json
import math
import os
import warnings

import typer

from dpft.cli import audit, data, demo, ledger
from dpft.cli.allocator import keep_freed_memory
from dpft.cli.errors import handles_errors
from dpft.cli.train import train_command
from dpft.models.precision import DTYPE_HELP

app = typer.Typer(
    name="dpft",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Differentially private fine-tuning of LLMs, with audits that show what a model leaks.",
)
app.command("train", help="Fine-tune a causal LM with DP-SGD (LoRA by default) and write a run directory.")(
    train_command
)


@app.command("account")
@handles_errors
def account(
    sample_rate: float = typer.Option(..., "--sample-rate", help="Poisson sampling rate q = expected batch / units."),
    steps: int = typer.Option(..., "--steps", help="Number of DP-SGD steps."),
    delta: float = typer.Option(1e-5, "--delta", help="Target δ."),
    noise_multiplier: float | None = typer.Option(None, "--noise-multiplier", help="σ: report ε for it."),
    target_epsilon: float | None = typer.Option(None, "--target-epsilon", help="Report the σ that reaches this ε."),
    accountant: str = typer.Option("pld", "--accountant", help="pld or rdp."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """ε for (q, σ, steps, δ), or the σ that reaches a target ε.

    With --accountant pld, ε is the smaller of two upper bounds, PLD and RDP; the output says
    which one it is ("bound"), and --json gives both.
    """
    from dpft.errors import ConfigError
    from dpft.privacy.accounting import Segment, calibrate_noise, epsilon_bound

    if (noise_multiplier is None) == (target_epsilon is None):
        raise ConfigError(["give exactly one of --noise-multiplier or --target-epsilon"])
    out: dict = {"sample_rate": sample_rate, "steps": steps, "delta": delta, "accountant": accountant}
    if target_epsilon is not None:
        out["target_epsilon"] = target_epsilon
        noise_multiplier = calibrate_noise(sample_rate, steps, delta, target_epsilon, accountant)
    bound = epsilon_bound([Segment(sample_rate, noise_multiplier, steps)], delta, accountant)
    out |= {
        "noise_multiplier": noise_multiplier,
        "epsilon": bound.epsilon,
        "bound": bound.method,
        "epsilon_pld": bound.pld,
        "epsilon_rdp": bound.rdp,
        "pld_discretization": bound.pld_discretization,
    }
    if json_out:
        print(json.dumps({k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in out.items()}))
    else:
        print(
            f"σ = {noise_multiplier:.4f}  ε = {bound.epsilon:.4f}  (δ = {delta:g}, q = {sample_rate:g}, "
            f"{steps} steps, {bound.method.upper()} bound)"
        )


@app.command("generate")
@handles_errors
def generate(
    run: str = typer.Option(..., "--run", help="Run directory (or a model id/path with --base)."),
    prompt: str | None = typer.Option(None, "--prompt", help="Raw text prompt, continued as is."),
    chat: str | None = typer.Option(None, "--chat", help="A user message, wrapped in the model's chat template."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    base: bool = typer.Option(False, "--base", help="Treat --run as a plain model id or path, not a run directory."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Generate from a trained run (or any model with --base)."""
    from dpft.errors import ConfigError
    from dpft.generate import generate_text
    from dpft.models import load_base_model, load_run_model
    from dpft.models.precision import announce, resolve_dtype

    if (prompt is None) == (chat is None):
        raise ConfigError(["give exactly one of --prompt or --chat"])
    compute = resolve_dtype(dtype)
    announce(compute)
    loaded = load_base_model(run) if base else load_run_model(run)
    text = generate_text(
        loaded.model,
        loaded.tokenizer,
        prompt=prompt,
        chat=chat,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        dtype=compute,
    )
    print(json.dumps({"completion": text}) if json_out else text)


for _command in (data, audit, demo, ledger):
    _command.register(app)


def _quiet_libraries() -> None:
    """Library progress bars and deprecation chatter would bury our one-line messages."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars follow it
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:
    keep_freed_memory()  # before the first large allocation: see dpft/cli/allocator.py
    _quiet_libraries()
    app()


if __name__ == "__main__":
    main()
