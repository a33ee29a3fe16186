"""Crash a run (target ε = 3) before its first checkpoint, grow the data 20 → 60 records, resume.

Prints the ε the resumed run reports, or the refusal. Runs against any checkout (figures, not a test):

    PYTHONPATH=src python benchmarks/resume_changed_data.py .
    git worktree add /tmp/old 8a112d0 && PYTHONPATH=/tmp/old/src python benchmarks/resume_changed_data.py /tmp/old
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path

import dpft
from dpft.errors import DpftError
from dpft.training import recipe


class Crash(Exception):
    pass


def tiny_model(checkout: Path, where: Path) -> Path:
    sys.path.insert(0, str(checkout / "tests"))
    try:
        from helpers import tiny_llama, tiny_tokenizer
    except ImportError:  # older checkouts kept the builders in conftest
        from conftest import tiny_llama, tiny_tokenizer
    tiny_llama().save_pretrained(where)
    tiny_tokenizer().save_pretrained(where)
    return where


def write_records(path: Path, n: int) -> None:
    rows = [{"prompt": f"record {i}: patient has", "completion": f" condition {i % 7}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(checkout: Path) -> None:
    tmp = Path(tempfile.mkdtemp())
    model = tiny_model(checkout, tmp / "model")
    data, run = tmp / "d.jsonl", tmp / "run"
    write_records(data, 20)
    name = "_train_step" if hasattr(recipe, "_train_step") else "_step"
    real, calls = getattr(recipe, name), {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Crash
        return real(*args, **kwargs)

    setattr(recipe, name, crashing)
    opts = dict(model=str(model), batch_size=4, micro_batch_size=4, epochs=3, max_length=64, quiet=True)
    with contextlib.suppress(Crash):
        dpft.train(str(data), str(run), **opts, epsilon=3.0, delta=1e-3, checkpoint_every=0)
    setattr(recipe, name, real)
    write_records(data, 60)
    try:
        report = dpft.train("", "", resume=str(run), quiet=True)
        print(f"resumed on 60 records: ε reported {report['epsilon']:.3f} (target 3.0), {report['steps']} steps")
    except DpftError as err:
        print(f"resume refused: {err}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
