"""kill -9 the trainer at injected and random points; `dpft train --resume` must always finish with
an ε for every step that touched the data (DESIGN.md invariant 6), and a loadable model.

The trainers are real processes running the real CLI, forked from a warm server
(tests/crash_helpers.py) so that a kill costs milliseconds, plus one plain
`python -m dpft.cli.main` subprocess killed at a random time. Kill times are seeded.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dpft.hashing import sha256_file
from dpft.ledger import BudgetLedger
from dpft.models import load_run_model
from dpft.privacy.accounting import compute_epsilon

HERE = Path(__file__).parent
HELPER = HERE / "crash_helpers.py"
pytestmark = pytest.mark.slow  # real processes, killed

PLANNED, EVERY, DELTA, SIGMA = 24, 5, 1e-3, 1.0
SURVIVED = {"kills": 0}  # reported at the end of the module


class Trainers:
    """Client of the fork server: start a CLI child, kill it, reap it."""

    def __init__(self, tmp: Path):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPER), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}
        self.tmp, self.count = tmp, 0

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, argv: list[str], kill: dict | None = None) -> tuple[int, Path]:
        self.count += 1
        err = self.tmp / f"child-{self.count}.err"
        env = {"DPFT_LEDGER": os.environ["DPFT_LEDGER"]}
        request = {"argv": argv, "out": str(self.tmp / f"child-{self.count}.out"), "err": str(err), "env": env}
        return self._ask({**request, "kill": kill})["pid"], err

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})["rc"]

    def run(self, argv: list[str], kill: dict | None = None) -> tuple[int, str]:
        pid, err = self.start(argv, kill)
        rc = self.wait(pid)
        return rc, err.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    t = Trainers(tmp_path_factory.mktemp("trainers"))
    yield t
    t.close()
    print(f"\nfault injection: {SURVIVED['kills']} SIGKILLs survived")


def write_data(tmp: Path, n: int = 40) -> Path:
    path = tmp / "d.jsonl"
    rows = [{"prompt": f"record {i}: patient {i % 10} has", "completion": f" condition {i % 7}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_argv(tmp: Path, model: str, run: Path, epsilon: float | None = None, steps: int = PLANNED) -> list[str]:
    """σ given without a target ε (no budget stop), unless `epsilon` is given: then σ is calibrated."""
    cfg = tmp / f"{run.name}.yaml"
    cfg.write_text(yaml.safe_dump({"epsilon": epsilon, "noise_multiplier": None if epsilon else SIGMA}))
    return [
        "train",
        "--config",
        str(cfg),
        "--data",
        str(write_data(tmp)),
        "--output",
        str(run),
        "--model",
        model,
        "--batch-size",
        "8",
        "--micro-batch-size",
        "8",
        "--max-steps",
        str(steps),
        "--max-length",
        "48",
        "--delta",
        str(DELTA),
        "--checkpoint-every",
        str(EVERY),
        "--quiet",
    ]


def snapshot(run: Path) -> dict:
    """What a crash left: journal lines, metric rows, the latest checkpoint's step."""
    latest = run / "private" / "checkpoints" / "latest"
    return {
        "journal": _lines(run / "private" / "journal.jsonl"),
        "metrics": _lines(run / "metrics.jsonl"),
        "ckpt": int(latest.read_text().split("-")[1]) if latest.is_file() else 0,
        "complete": (run / "privacy.json").is_file(),
    }


def one_error_line(stderr: str) -> bool:
    """Exactly one `dpft: error:` line, and it is the last (library progress bars and warnings aside)."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("dpft: error:")]
    return len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in stderr


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def check_crashed(run: Path, after: dict, updates_done: int | None = None) -> None:
    # Breaks if a step reads its batch before its journal line is durable, or if a crashed run is
    # presented as complete.
    assert not after["complete"], "a killed run must never look complete"
    assert after["journal"] >= after["metrics"]
    if updates_done is not None:
        assert after["journal"] >= updates_done


def resume_and_check(trainers: Trainers, run: Path, before: dict, target: float | None = None) -> dict:
    rc, err = trainers.run(["train", "--resume", str(run), "--quiet"])
    assert rc == 0, err
    privacy = json.loads((run / "privacy.json").read_text())
    touched = _lines(run / "private" / "journal.jsonl")
    # Every step of the crashed attempts is still counted, and exactly the steps after the last
    # checkpoint are redone (breaks if the journal were reset, or steps skipped, on resume).
    redo = PLANNED - before["ckpt"]
    if target is None:
        assert touched == before["journal"] + redo
    else:  # the budget may stop the redo early, never late
        assert before["journal"] < touched <= before["journal"] + redo
        assert privacy["epsilon"] <= target
    assert privacy["steps"] == touched >= PLANNED
    q, sigma = privacy["sample_rate"], privacy["noise_multiplier"]
    assert privacy["epsilon"] == pytest.approx(compute_epsilon(q, sigma, touched, DELTA), rel=1e-9)
    rows = [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, len(rows) + 1)) and len(rows) == touched - before["journal"] + before["ckpt"]
    assert "differential privacy" in (run / "model" / "README.md").read_text()
    loaded = load_run_model(run)
    assert loaded.model(**loaded.tokenizer("record 1", return_tensors="pt")).logits.ndim == 3
    return privacy


INJECTED = [
    # (hook, n, noisy updates certainly done before the kill)
    ("step", 3, 3),  # before the first checkpoint: resume must start over, counting the 3 lost steps
    ("noise", 12, 11),  # step 12 drew its noise, no update yet
    ("ckpt_file", 2, 10),  # half-written weights in the temp folder of the step-10 checkpoint
    ("ckpt_latest", 3, 15),  # step-15 folder renamed in, `latest` still at step 10
    ("save_model", 1, PLANNED),  # all steps done, model half-saved, no privacy.json
    ("card", 1, PLANNED),  # model written, card not: privacy.json must not exist yet
    ("privacy", 1, PLANNED),  # model and card written, privacy.json not
]


@pytest.mark.parametrize("hook,n,done", INJECTED, ids=[f"{h}-{n}" for h, n, _ in INJECTED])
def test_injected_kill_then_resume(trainers, tmp_path, tiny_model_dir, hook, n, done):
    run = tmp_path / "run"
    rc, err = trainers.run(train_argv(tmp_path, tiny_model_dir, run), kill={"at": hook, "n": n})
    assert rc == -signal.SIGKILL, err
    before = snapshot(run)
    check_crashed(run, before, done)
    resume_and_check(trainers, run, before)
    SURVIVED["kills"] += 1


def test_kills_and_resumes_stop_at_the_dataset_budget(trainers, tmp_path, tiny_model_dir):
    """--dataset-budget fits 26 steps, not 27; 24 planned. Killed in step 24 (24 journalled, checkpoint at
    20), then the resume killed after one step (25): redoing the 4 steps after the checkpoint would make
    29 on the dataset, so the last resume stops after one. Breaks if a resume neither re-records its
    journal in the ledger before its first step nor stops at the dataset budget."""
    run = tmp_path / "run"
    eps = [compute_epsilon(8 / 40, SIGMA, n, DELTA) for n in (26, 27)]
    budget = sum(eps) / 2
    argv = [*train_argv(tmp_path, tiny_model_dir, run), "--dataset-budget", repr(budget)]
    rc, err = trainers.run(argv, kill={"at": "noise", "n": PLANNED})  # step 24 journalled and noised, no update
    assert rc == -signal.SIGKILL, err
    assert snapshot(run) == {"journal": PLANNED, "metrics": PLANNED - 1, "ckpt": 20, "complete": False}
    resume = ["train", "--resume", str(run), "--quiet"]
    rc, err = trainers.run(resume, kill={"at": "step", "n": 1})
    assert rc == -signal.SIGKILL, err
    assert snapshot(run)["journal"] == PLANNED + 1
    # The entry this resume recorded before its first step, never replaced: the journal it found and
    # the 4 steps still planned (never fewer steps than the journal holds).
    [entry] = [e for e in BudgetLedger().history() if e.output == str(run.resolve())]
    assert sum(s.steps for s in entry.segments) == PLANNED + 4
    rc, err = trainers.run(resume)
    assert rc == 0, err
    privacy = json.loads((run / "privacy.json").read_text())
    assert privacy["steps"] == _lines(run / "private" / "journal.jsonl") == 26
    assert "--dataset-budget" in privacy["stop_reason"] and privacy["epsilon"] == pytest.approx(eps[0])
    assert BudgetLedger().spend(sha256_file(tmp_path / "d.jsonl"), DELTA).epsilon <= budget


def test_random_kills_across_resumes(trainers, tmp_path, tiny_model_dir):
    """One run killed at three seeded random times (the resumes too), then finished; a second run
    with a target ε, where the redone steps meet the budget's hard stop."""
    rng = random.Random(20240607)
    for target in (None, 4.0):
        run = tmp_path / f"run-{target}"
        argv = train_argv(tmp_path, tiny_model_dir, run, epsilon=target)
        kills = 3 if target is None else 1
        for _ in range(kills):
            pid, _ = trainers.start(argv)
            _wait_for_lines(run / "metrics.jsonl", 1 if argv[1] != "--resume" else 0, pid)
            time.sleep(rng.uniform(0.0, 0.6))
            os.kill(pid, signal.SIGKILL)
            rc = trainers.wait(pid)
            after = snapshot(run)
            if rc == 0:  # finished before the kill landed: nothing to resume
                pytest.fail(f"the run finished before the kill; lower the delay ({after})")
            check_crashed(run, after)
            SURVIVED["kills"] += 1
            argv = ["train", "--resume", str(run), "--quiet"]
        resume_and_check(trainers, run, snapshot(run), target=target)


def _wait_for_lines(path: Path, lines: int, pid: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while _lines(path) < lines:
        assert time.monotonic() < end, "the trainer never started"
        time.sleep(0.01)


def test_real_subprocess_kill_and_resume(tmp_path, tiny_model_dir):
    """The plain `python -m dpft.cli.main` entry point, killed mid-run and resumed."""
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dpft.cli.main"]
    proc = subprocess.Popen([*cmd, *train_argv(tmp_path, tiny_model_dir, run, steps=PLANNED)], env=env)
    _wait_for_lines(run / "metrics.jsonl", 7, proc.pid)  # past the first checkpoint
    time.sleep(random.Random(7).uniform(0.0, 0.2))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    before = snapshot(run)
    check_crashed(run, before)
    SURVIVED["kills"] += 1
    res = subprocess.run([*cmd, "train", "--resume", str(run), "--quiet"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    privacy = json.loads((run / "privacy.json").read_text())
    touched = _lines(run / "private" / "journal.jsonl")
    assert privacy["steps"] == touched == before["journal"] + PLANNED - before["ckpt"]
    assert privacy["epsilon"] == pytest.approx(compute_epsilon(privacy["sample_rate"], SIGMA, touched, DELTA))
    load_run_model(run)


@pytest.mark.parametrize("damage", ["truncate", "tamper", "manifest"])
def test_damaged_checkpoint_is_refused_by_the_cli(trainers, tmp_path, tiny_model_dir, damage):
    run = tmp_path / "run"
    rc, err = trainers.run(train_argv(tmp_path, tiny_model_dir, run), kill={"at": "step", "n": 7})
    assert rc == -signal.SIGKILL, err
    ckpt = run / "private" / "checkpoints" / (run / "private" / "checkpoints" / "latest").read_text().strip()
    weights = ckpt / "weights.safetensors"
    if damage == "truncate":
        os.truncate(weights, weights.stat().st_size - 100)
    elif damage == "tamper":
        blob = bytearray(weights.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        weights.write_bytes(bytes(blob))
    else:
        (ckpt / "manifest.json").write_text("{")
    journal = (run / "private" / "journal.jsonl").read_text()
    rc, err = trainers.run(["train", "--resume", str(run), "--quiet"])
    # Breaks if the damage were not detected (resume from corrupt weights) or if the CLI let the
    # error out as a traceback.
    assert rc == 2, err
    assert one_error_line(err) and "Traceback" not in err
    assert ("checksum" in err) if damage != "manifest" else ("manifest" in err)
    assert (run / "private" / "journal.jsonl").read_text() == journal  # refused before touching the data
    assert not (run / "privacy.json").exists()


def test_killed_cache_conversion_is_rebuilt(tmp_path):
    """Kill the embedded-model conversion mid-write: no half-written cache is ever used, and the
    next call rebuilds a complete one (and clears the dead conversion's temp folder)."""
    cache = tmp_path / "cache"
    env = dict(os.environ, DPFT_CACHE=str(cache), OMP_NUM_THREADS="1")
    slow = subprocess.Popen(
        [sys.executable, str(HELPER), "convert", "slow"], env=env, stdout=subprocess.PIPE, text=True
    )
    assert slow.stdout.readline().strip() == "writing"
    slow.send_signal(signal.SIGKILL)
    assert slow.wait() == -signal.SIGKILL
    SURVIVED["kills"] += 1
    models = cache / "models"
    target = models / "smollm2-135m-instruct"
    # Breaks if the converter wrote into the final folder: a half cache would be in place.
    assert not target.exists()
    assert [p.name for p in models.glob(".smollm2-135m-instruct-*")]  # the dead conversion's temp folder
    # A plausible older crash left an incomplete folder at the final path: it must not be used.
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"half")
    res = subprocess.run(
        [sys.executable, str(HELPER), "convert", "fast"], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["target"] == str(target)
    assert json.loads((target / "tokenizer.json").read_text()) == {"complete": True}
    assert (target / "model.safetensors").read_bytes() == b"w" * 4096
    assert (target / "dpft-cache-complete").is_file()
    # Breaks without the lock-and-sweep in embedded_model_dir: each crash would leak a temp folder.
    assert not list(models.glob(".smollm2-135m-instruct-*"))
