"""The step-cost benchmark runs end to end on a tiny random Llama and writes the JSON it documents."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cost.py"


@pytest.mark.slow
def test_quick_benchmark_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "step_cost.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--repeats", "1", "--json-out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    assert {"config", "variants", "ratios", "load_avg_before", "load_avg_after"} <= result.keys()
    assert set(result["variants"]) == {"plain", "dpft", "opacus_hooks", "opacus_ghost"}
    for name in ("plain", "dpft", "opacus_hooks"):
        figures = result["variants"][name]
        assert {"s_per_step", "min", "max", "tokens_per_s", "peak_rss_mb", "setup_rss_mb"} <= figures.keys(), name
        assert figures["s_per_step"] > 0 and figures["peak_rss_mb"] > 0
    assert "Parameter tying" in result["variants"]["opacus_ghost"]["error"]  # the tiny Llama ties its head
    assert result["ratios"]["time_dpft_over_plain"] > 0
    assert result["ratios"]["peak_rss_dpft_over_plain"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("script", ["demo_step.py", "demo_profile.py"])
def test_demo_benchmarks_run_on_a_tiny_model(script: str, tmp_path: Path) -> None:
    """The demo's benchmarks import the recipe and the sampler: a refactor must not leave them broken."""
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(SCRIPT.parent / script), "--quick", "--repeats", "1", "--json-out", str(out)]
    if script == "demo_step.py":
        cmd += ["--variants", "plain,dp"]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    if script == "demo_step.py":
        assert result["dtype"] in ("fp32", "bf16") and result["hardware"]["capability"]
        assert all(v["wall_s"] > 0 for v in result["variants"].values()) and result["ratios"]["dp/plain"] > 0
    else:
        assert result["step_per_micro_batch"] and result["data"]["examples"] > 0


@pytest.mark.slow
def test_trainer_step_benchmark_times_the_three_loops(tmp_path: Path, tiny_model_dir: str) -> None:
    out = tmp_path / "trainer_step.json"
    script = SCRIPT.parent / "trainer_step.py"
    cmd = [sys.executable, str(script), "--model", tiny_model_dir, "--repeats", "2", "--max-length", "128"]
    subprocess.run([*cmd, "--json-out", str(out)], check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"plain_trainer", "dpft_train", "dp_trainer"}
    assert all(v["steps"] == 2 and v["s_per_step"] > 0 for v in result["variants"].values())
    assert {"cpu", "capability", "native_bf16", "threads"} <= result["hardware"].keys()
    assert result["ratios"]["plain_trainer_over_plain_trainer"] == 1.0
