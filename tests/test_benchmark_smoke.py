"""The step-cost benchmark runs end to end on a tiny random Llama and writes the JSON it documents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

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


def _utility_module():
    """benchmarks/utility.py imported by path (benchmarks/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("utility_benchmark", SCRIPT.parent / "utility.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_utility_benchmark_statistics():
    """Wilson intervals at known values, the paired bootstrap of DP/plain, one held-out record per patient."""
    u = _utility_module()
    z2 = u.Z95**2
    assert u.wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert u.wilson_interval(0, 8) == pytest.approx([0.0, z2 / (8 + z2)])
    assert u.wilson_interval(8, 8) == pytest.approx([8 / (8 + z2), 1.0])
    assert u.wilson_interval(0, 8)[0] == 0.0 and u.wilson_interval(8, 8)[1] == 1.0  # exactly: 0 <= p <= 1 holds
    half = u.paired_ratio([True, True, False, False] * 5, [True] * 20, n_boot=500, seed=0)
    assert half["ratio"] == 0.5 and half["difference"] == -0.5
    assert 0.2 < half["ratio_ci"][0] < 0.5 < half["ratio_ci"][1] < 0.8 and half["resamples_dropped"] == 0
    same = u.paired_ratio([True, False] * 10, [True, False] * 10, n_boot=500, seed=0)
    assert same["ratio"] == 1.0 and same["ratio_ci"] == [1.0, 1.0]  # paired: the same records for both
    assert u.paired_ratio([True] * 4, [False] * 4, n_boot=50, seed=0)["ratio"] is None
    holdout = [{"user_id": f"P{i // 3}"} for i in range(30)]  # 10 patients, 3 records each
    sample = u.holdout_sample(holdout, 6, seed=0)
    assert len({holdout[i]["user_id"] for i in sample}) == 6 == len(sample) and sample == sorted(sample)
    assert sample == u.holdout_sample(holdout, 6, seed=0) and len(u.holdout_sample(holdout, 50, seed=0)) == 10


@pytest.mark.slow
def test_utility_benchmark_runs_on_a_tiny_model(tmp_path: Path, tiny_model_dir: str) -> None:
    out = tmp_path / "utility"
    cmd = [sys.executable, str(SCRIPT.parent / "utility.py"), "--model", tiny_model_dir, "--output", str(out)]
    cmd += ["--patients", "40", "--records-per-patient", "1,2", "--plain-epochs", "1", "--dp-epochs", "1"]
    cmd += ["--batch-size", "8", "--dp-batch-size", "8", "--lora-layers", "1", "--holdout-sample", "6"]
    cmd += ["--device", "cpu", "--quiet"]  # --epsilons: the default 8,3
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    result = json.loads((out / "utility.json").read_text())
    assert {"cpu", "capability", "native_bf16", "threads", "device", "dtype"} <= result["machine"].keys()
    assert result["machine"]["device"] == "cpu" and result["machine"]["dtype"] in ("fp32", "bf16")
    assert set(result["models"]) == {"plain", "dp-eps8", "dp-eps3"}
    plain = result["models"]["plain"]
    for name, m in result["models"].items():
        full, (lo, hi) = m["exact_match"]["full"], m["exact_match_ci"]
        assert m["records"] == 6 and m["correct"] == round(full * 6) and lo <= full <= hi, name
        assert {"last_name", "condition"} <= m["exact_match"].keys() and len(m["per_record"]) == 6
        privacy = json.loads((Path(m["run"]) / "privacy.json").read_text())
        assert m["epsilon"] == privacy["epsilon"] and m["steps"] == privacy["steps"] > 0
        if name == "plain":
            assert privacy["dp"] is False and m["epsilon"] is None and "dp_over_plain" not in m
            continue
        assert privacy["dp"] is True and privacy["privacy_unit"] == "user" and privacy["max_records_per_user"] == 1
        assert m["target_epsilon"] == privacy["target_epsilon"] and 0 < m["epsilon"] <= m["target_epsilon"]
        ratio = m["dp_over_plain"]
        assert {"ratio", "ratio_ci", "difference", "difference_ci"} <= ratio.keys()
        if plain["exact_match"]["full"]:  # a tiny model often matches nothing: then there is no ratio
            assert ratio["ratio"] == pytest.approx(full / plain["exact_match"]["full"])
        else:
            assert ratio["ratio"] is None and ratio["ratio_ci"] is None
    assert result["models"]["dp-eps3"]["noise_multiplier"] > result["models"]["dp-eps8"]["noise_multiplier"]
    lines = done.stdout.splitlines()
    assert sum("fine-tune" in line for line in lines) == 3 and sum("evaluation" in line for line in lines) == 3
    assert any(line.startswith("| dp-eps3 | 3 |") for line in lines) and "Ran on: CPU" in done.stdout
    prompts = [json.loads(line)["prompt"] for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert not any(p in done.stdout + done.stderr for p in prompts)  # no training text in the output
    _dp_settings_varies_one_setting(out, plain["per_record"], prompts)
    _plain_memorisation_scores_every_patient(out / "data", tmp_path / "mem", tiny_model_dir, prompts)


def _dp_settings_varies_one_setting(base: Path, plain: list[bool], prompts: list[str]) -> None:
    """benchmarks/dp_settings.py on the utility run: the variant's setting changed, the rest as utility.py's DP run."""
    cmd = [sys.executable, str(SCRIPT.parent / "dp_settings.py"), "--base", str(base), "--quiet"]
    cmd += ["--variant", "b4:batch_size=4,epochs=1,max_grad_norm=0.5", "--epsilon", "3"]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    (row,) = json.loads((base / "settings.json").read_text())["runs"]
    cfg = yaml.safe_load((base / "settings" / "b4" / "config.yaml").read_text())
    assert (cfg["batch_size"], cfg["epochs"], cfg["max_grad_norm"], cfg["lora_layers"]) == (4, 1.0, 0.5, 1)
    assert (cfg["privacy_unit"], cfg["max_records_per_user"], cfg["lr"], cfg["epsilon"]) == ("user", 1, 1e-2, 3.0)
    assert row["records"] == len(plain) and row["changes"] == {"batch_size": 4, "epochs": 1.0, "max_grad_norm": 0.5}
    assert any(line.startswith("| b4 | batch_size=4") for line in done.stdout.splitlines())
    assert not any(p in done.stdout + done.stderr for p in prompts)


def _plain_memorisation_scores_every_patient(data: Path, out: Path, model: str, prompts: list[str]) -> None:
    """benchmarks/plain_memorisation.py: the demo's plain run with the variant's change, every patient scored."""
    cmd = [sys.executable, str(SCRIPT.parent / "plain_memorisation.py"), "--data", str(data), "--output", str(out)]
    cmd += ["--model", model, "--variant", "w2:lora_layers=1,epochs=1,warmup_steps=2"]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    cfg = yaml.safe_load((out / "w2" / "config.yaml").read_text())
    assert (cfg["no_dp"], cfg["lora_layers"], cfg["warmup_steps"], cfg["loss_on"]) == (True, 1, 2, "all")
    members = {r["user_id"] for r in map(json.loads, (data / "train.jsonl").read_text().splitlines()) if "prompt" in r}
    assert row["members"] == len(members) and row["advantage"] == pytest.approx(
        row["member_rate"] - row["non_member_rate"]
    )
    assert not any(p in done.stdout + done.stderr for p in prompts)


@pytest.mark.slow
def test_one_run_power_benchmark_runs_on_a_tiny_model(tmp_path: Path) -> None:
    """Every design, plain and DP, each score alone and the audit's choice: the table and the JSON it documents."""
    script = SCRIPT.parent / "one_run_power.py"
    cmd = [sys.executable, str(script), "--output", str(tmp_path), "--canaries", "40", "--patients", "6"]
    cmd += ["--epochs", "2", "--alternatives", "2", "--tiny-width", "32"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(SCRIPT.parents[1] / d) for d in ("src", "tests"))}
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300, env=env)
    result = json.loads((tmp_path / "one_run_power.json").read_text())
    assert set(result["designs"]) == {"rare-prefix", "random-words", "name-digits"}
    for design, models in result["designs"].items():
        assert set(models) == {"plain", "dp"}, design
        assert models["plain"]["epsilon"] is None and 0 < models["dp"]["epsilon"] <= 8.0
        for m in models.values():
            assert set(m["by_score"]) == {"reference", "loss", "zlib", "alternatives"}
            assert m["chosen"]["m"] == 30 and m["chosen"]["epsilon_lower_bound"] >= 0
    assert "| rare-prefix | plain (∞) |" in done.stdout and "| name-digits | dp (" in done.stdout
