"""Subprocess side of the crash tests (tests/test_fault_injection.py). Not a test module.

`python tests/crash_helpers.py serve` is a fork server: it imports torch, transformers, peft and
dpft once (no tensor work, so forking is safe), then for each JSON request on stdin forks a child
that runs the real `dpft` CLI (`dpft.cli.main.app`) with its stdout/stderr in files. Each child is
a real process, killed with SIGKILL by the test (at a random time) or by itself at an injected
point (`kill`, see `HOOKS`). Starting a child costs milliseconds instead of seconds of imports, so
a test can afford many kills. Requests and replies, one JSON object per line:

    {"argv": [...], "out": path, "err": path, "env": {...}, "kill": {"at": name, "n": k} | null}
        -> {"pid": pid}
    {"wait": pid} -> {"rc": exit code, or -signal}

`python tests/crash_helpers.py convert slow|fast` runs `embedded_model_dir()` with a fake
converter (the real one takes 15 s): `slow` writes a file, then waits to be killed mid-write.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _nth(n: int):
    count = {"calls": 0}

    def hit() -> bool:
        count["calls"] += 1
        return count["calls"] == n

    return hit


def _hook_step(n: int) -> None:
    """Die right after the n-th step's noisy update (the step touched the data; no metrics row yet)."""
    from dpft.training import recipe

    real, hit = recipe._train_step, _nth(n)

    def step(*args, **kwargs):
        out = real(*args, **kwargs)
        if hit():
            _die()
        return out

    recipe._train_step = step


def _hook_noise(n: int) -> None:
    """Die after the n-th step's noise is drawn, before its optimizer update."""
    from dpft.privacy import step

    real, hit = step.add_gaussian_noise, _nth(n)

    def noise(*args, **kwargs):
        real(*args, **kwargs)
        if hit():
            _die()

    step.add_gaussian_noise = noise


def _hook_ckpt_file(n: int) -> None:
    """Die in the n-th checkpoint write, leaving its weights file half-written in the temp folder."""
    from dpft.training import checkpoint

    real, hit = checkpoint.save_file, _nth(n)

    def save_file(tensors, path, *args, **kwargs):
        real(tensors, path, *args, **kwargs)
        if hit():
            size = os.path.getsize(path)
            os.truncate(path, size // 2)
            _die()

    checkpoint.save_file = save_file


def _hook_ckpt_latest(n: int) -> None:
    """Die in the n-th checkpoint write after its folder is renamed in, before `latest` moves."""
    from dpft.training import checkpoint

    real, hit = checkpoint.write_text_atomic, _nth(n)

    def write_atomic(path, text):
        if hit():
            _die()
        real(path, text)

    checkpoint.write_text_atomic = write_atomic


def _hook_save_model(n: int) -> None:
    """Die while the final model is saved: weights written, tokenizer and dpft-model.json not."""
    from dpft.training import recipe

    def save_model(paths, model, *args, **kwargs):
        model.save_pretrained(paths.model, safe_serialization=True)
        _die()

    recipe.save_model = save_model


def _hook_privacy(n: int) -> None:
    """Die just before privacy.json is written (everything else of the finished run is there)."""
    from dpft.training import recipe

    real = recipe.write_json

    def write_json(path, content):
        if path.name == "privacy.json":
            _die()
        real(path, content)

    recipe.write_json = write_json


def _hook_card(n: int) -> None:
    """Die just before the model card is written (model saved, report computed)."""
    from dpft.training import recipe

    def write_model_card(*args, **kwargs):
        _die()

    recipe.write_model_card = write_model_card


HOOKS = {
    "step": _hook_step,
    "noise": _hook_noise,
    "ckpt_file": _hook_ckpt_file,
    "ckpt_latest": _hook_ckpt_latest,
    "save_model": _hook_save_model,
    "card": _hook_card,
    "privacy": _hook_privacy,
}


def _child(request: dict) -> None:
    os.environ.update(request.get("env") or {})
    for fd, path in ((1, request["out"]), (2, request["err"])):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the server's request pipe
    code = 1
    try:
        if request.get("kill"):
            HOOKS[request["kill"]["at"]](request["kill"].get("n", 1))
        from dpft.cli.main import app

        app(args=request["argv"], prog_name="dpft")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import dpft.cli.main
    import dpft.training.recipe  # noqa: F401

    reply = sys.stdout
    reply.write(json.dumps({"ready": True}) + "\n")
    reply.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if "wait" in request:
            _, status = os.waitpid(request["wait"], 0)
            rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            reply.write(json.dumps({"rc": rc}) + "\n")
        else:
            pid = os.fork()
            if pid == 0:
                _child(request)
            reply.write(json.dumps({"pid": pid}) + "\n")
        reply.flush()


def convert(mode: str) -> None:
    """Build the embedded-model cache with a fake converter; `slow` hangs mid-write to be killed."""
    from dpft.models import embedded

    def fake_convert(gguf: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"w" * 4096)
        if mode == "slow":
            with open(out / "tokenizer.json", "w") as f:
                f.write('{"half": ')
                f.flush()
                print("writing", flush=True)
                time.sleep(60)  # killed here
        (out / "tokenizer.json").write_text('{"complete": true}')

    embedded._convert = fake_convert
    embedded.gguf_path = lambda: Path("/nonexistent/fake.gguf")
    target = embedded.embedded_model_dir()
    print(json.dumps({"target": str(target)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    elif sys.argv[1] == "convert":
        convert(sys.argv[2])
