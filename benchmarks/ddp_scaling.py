"""Data-parallel scaling: the same logical DP job as 1 process × T threads and as W processes × 1 thread.

Both runs use the same unsafe seed, so they draw the same Poisson batches and add the same noise:
the only difference is who computes. Time is the sum of the per-step seconds in the private
train_log (process start and model loading excluded), median over steps reported too.

    python benchmarks/ddp_scaling.py                       # embedded SmolLM2-135M, LoRA, CPU
    python benchmarks/ddp_scaling.py --device cuda --nproc 2 --threads 1
    python benchmarks/ddp_scaling.py --model /path/to/tiny --steps 4 --json-out out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from dpft.run_layout import RunPaths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model id or path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--nproc", type=int, default=2, help="W data-parallel processes")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the single process (W × 1 for DDP)")
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="expected logical batch")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv)


def _records(path: Path, n: int) -> None:
    rows = [
        {"prompt": f"Patient {i} reports symptom {i % 13} since", "completion": f" day {i % 29}."} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _train(a: argparse.Namespace, data: Path, out: Path, nproc: int, threads: int) -> float:
    args = [
        "train", "--data", str(data), "--output", str(out), "--batch-size", str(a.batch),
        "--micro-batch-size", str(a.micro_batch), "--max-steps", str(a.steps), "--max-length", str(a.max_length),
        "--noise-multiplier", "1.0", "--epsilon", "1000", "--delta", "1e-5", "--checkpoint-every", "0",
        "--unsafe-seed", "11", "--quiet", "--device", a.device, "--dtype", "fp32",
    ]  # fmt: skip
    if a.model:
        args += ["--model", a.model]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "dpft.cli.main", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]
        cmd += ["dpft.cli.main", *args]
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - started


def _summary(run: Path, wall: float) -> dict:
    rows = [json.loads(r) for r in RunPaths(run).train_log.read_text().splitlines()]
    seconds = [r["seconds"] for r in rows]
    return {
        "steps": len(rows),
        "step_s_total": sum(seconds),
        "step_s_median": statistics.median(seconds),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _records(root / "d.jsonl", a.records)
        single = _train(a, root / "d.jsonl", root / "one", 1, a.threads)
        multi = _train(a, root / "d.jsonl", root / "many", a.nproc, 1)
        one, many = _summary(root / "one", single), _summary(root / "many", multi)
        w1 = load_file(root / "one" / "model" / "adapter_model.safetensors")
        w2 = load_file(root / "many" / "model" / "adapter_model.safetensors")
        max_diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
        same_privacy = (root / "one" / "privacy.json").read_text() == (root / "many" / "privacy.json").read_text()
    result = {
        "device": a.device,
        f"1 proc x {a.threads} threads": one,
        f"{a.nproc} procs x 1 thread": many,
        "speedup_steps": one["step_s_total"] / many["step_s_total"],
        "max_weight_diff": max_diff,
        "same_privacy_json": same_privacy,
        "logical_batch": a.batch,
        "micro_batch": a.micro_batch,
    }
    print(json.dumps(result, indent=1))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
