"""The compute dtype comes from the hardware: fp32 where bf16 would be emulated, and every output says which ran."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys

import pytest
import torch

from dpft.audit.report import write_report
from dpft.cli.summary import print_summary
from dpft.errors import ConfigError
from dpft.models import precision
from dpft.models.precision import autocast, describe_hardware, resolve_dtype
from dpft.training.config import TrainConfig


@pytest.fixture
def cpu_without_bf16(monkeypatch):
    """An AVX2-only CPU: oneDNN says no, and a bf16 matmul is ~70x slower than fp32."""
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": False)
    monkeypatch.setattr(precision, "bf16_slowdown", lambda: 70.4)
    precision._warn_emulated.cache_clear()
    yield
    precision._warn_emulated.cache_clear()


def test_auto_is_fp32_on_a_cpu_without_native_bf16(cpu_without_bf16):
    assert resolve_dtype("auto") == torch.float32
    assert resolve_dtype("fp32") == torch.float32


def test_auto_is_bf16_where_bf16_is_native(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": True)
    assert resolve_dtype("auto") == torch.bfloat16


def test_explicit_bf16_without_native_bf16_is_kept_and_warns_once(cpu_without_bf16, caplog):
    with caplog.at_level(logging.WARNING, logger="dpft.models.precision"):
        assert resolve_dtype("bf16") == torch.bfloat16
        assert resolve_dtype("bf16") == torch.bfloat16
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "70x slower than fp32" in message and "--dtype auto would use fp32" in message and "\n" not in message


def test_a_bad_dtype_is_refused_with_the_flag_name():
    with pytest.raises(ConfigError, match=r"--dtype must be one of auto, fp32, bf16 \(got 'fp16'\)"):
        resolve_dtype("fp16")
    with pytest.raises(ConfigError) as err:
        TrainConfig(data="d.jsonl", output="out", dtype="fp16", weights_dtype="int8").validate()
    assert "--dtype must be one of auto, fp32, bf16 (got 'fp16')" in err.value.problems
    assert "--weights-dtype must be one of fp32, bf16 (got 'int8')" in err.value.problems


def test_config_defaults_ask_the_hardware_and_keep_fp32_weights():
    c = TrainConfig(data="d.jsonl", output="out")
    assert (c.dtype, c.weights_dtype) == ("auto", "fp32")
    c.validate()


def test_autocast_is_a_no_op_for_fp32_and_casts_matmuls_for_bf16():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(torch.float32):
        assert (a @ b).dtype == torch.float32
    with autocast(torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16


def test_describe_hardware_names_what_a_timing_depends_on():
    hw = describe_hardware()
    assert set(hw) == {"device", "cpu", "capability", "native_bf16", "threads"}
    assert hw["device"] == "cpu" and hw["cpu"] and hw["capability"] == torch.backends.cpu.get_cpu_capability()
    assert hw["threads"] == torch.get_num_threads() and isinstance(hw["native_bf16"], bool)


def test_announce_is_one_stderr_line_once(cpu_without_bf16, capsys, monkeypatch):
    monkeypatch.setattr(precision, "_cpu_name", lambda: "AMD EPYC")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    precision.announce.cache_clear()
    precision.announce(torch.float32)
    precision.announce(torch.float32)  # the demo's two runs and audits: said once
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "dtype: fp32 (CPU AMD EPYC, AVX2, no native bf16)\n"
    precision.announce.cache_clear()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 vector ISA caps")
def test_a_real_avx2_cpu_is_not_native_bf16():
    """ATen and oneDNN capped at AVX2 behave as an AVX2-only CPU does: no native bf16, auto is fp32."""
    env = os.environ | {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = "from dpft.models.precision import *; print(native_bf16(), resolve_dtype('auto'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "torch.float32"]


def test_report_and_summary_state_the_dtype_that_ran(tmp_path, capsys):
    models = {"dp": {"privacy": {"dp": True, "epsilon": 8.0}, "dtype": "fp32"}}
    write_report(tmp_path / "report.html", {"models": models})
    page = (tmp_path / "report.html").read_text()
    assert "<th>compute dtype</th>" in page and "<td>fp32</td>" in page and "bf16" not in page
    print_summary(models)
    row = next(line for line in capsys.readouterr().out.splitlines() if "compute dtype" in line)
    assert "fp32" in row


def test_demo_states_the_dtype_of_a_run(tmp_path):
    from dpft.demo import _ran_dtype

    TrainConfig(data="d.jsonl", output="out", dtype="fp32").save(tmp_path / "config.yaml")
    assert _ran_dtype(tmp_path, "fp32") == "fp32"
    assert _ran_dtype(tmp_path, "bf16") == "fp32 (training), bf16 (audits)"
