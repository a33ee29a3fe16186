"""Step time of the Trainer drop-in: `DPTrainer` vs `dpft train` vs a plain `transformers.Trainer`.

All three train LoRA (r=8 on q,v) of the same model on the same batch: B prompt/completion records
of examples/medical, every one of them in every step (the DP runs have q = 1 over N = B units, so
each Poisson draw is the whole set; the plain Trainer's batch is the same B records). One step is
what each loop does between two optimizer steps: for DPTrainer and the plain Trainer, the Trainer's
step (on_step_begin → training_step → optimizer → scheduler → on_step_end; the plain Trainer's
collation happens before on_step_begin); for dpft train, `recipe._train_step` (journal, draw,
collate, clip, noise, AdamW). The three loops run in threads that take turns, one step each per
round, so a burst of load on the shared machine hits them alike; the median over rounds after
one warm-up step is reported, with the min and max.

    python benchmarks/trainer_step.py                                   # embedded SmolLM2-135M, fp32
    python benchmarks/trainer_step.py --model path/to/tiny --repeats 1  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from dpft.data import collate, encode_records, read_records
from dpft.hf import DPTrainer, PrivacyArguments
from dpft.models import load_base_model, with_lora
from dpft.models.embedded import EMBEDDED_NAME
from dpft.models.precision import describe_hardware, dtype_name, resolve_dtype
from dpft.training import recipe
from dpft.training.config import TrainConfig

DATA = Path(__file__).resolve().parents[1] / "examples" / "medical" / "train.jsonl"
VARIANTS = ("plain_trainer", "dpft_train", "dp_trainer")
LR, SIGMA, CLIP, DELTA = 1e-4, 1.0, 1.0, 1e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_NAME, help="hub id or path (default: the embedded SmolLM2-135M)")
    p.add_argument("--batch", type=int, default=8, help="records per step (the whole set, every step)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per example at most")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="fp32", help="bf16 only where native")
    p.add_argument("--json-out", default=None, help="also write the figures here")
    return p.parse_args(argv)


class Turns:
    """Round robin over the variants: one step each, in order; an error anywhere stops every thread."""

    def __init__(self, names: list[str]):
        self.names, self.current, self.failed = names, 0, False
        self.cond = threading.Condition()
        self.seconds: dict[str, list[float]] = {n: [] for n in names}
        self._started: dict[str, float] = {}

    def begin(self, name: str) -> None:
        with self.cond:
            while self.names[self.current] != name and not self.failed:
                self.cond.wait()
            if self.failed:
                raise RuntimeError("another variant failed")
        self._started[name] = time.perf_counter()

    def end(self, name: str) -> None:
        self.seconds[name].append(time.perf_counter() - self._started.pop(name))
        with self.cond:
            self.current = (self.current + 1) % len(self.names)
            self.cond.notify_all()

    def leave(self, name: str) -> None:
        """A variant that finished (or failed) gives up its turns."""
        with self.cond:
            self.names = [n for n in self.names if n != name]
            self.current = self.current % len(self.names) if self.names else 0
            self.cond.notify_all()

    def fail(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()


class Timed(TrainerCallback):
    def __init__(self, turns: Turns, name: str):
        self.turns, self.name = turns, name

    def on_step_begin(self, args, state, control, **kwargs):
        self.turns.begin(self.name)

    def on_step_end(self, args, state, control, **kwargs):
        self.turns.end(self.name)


def lora(model_name: str):
    torch.manual_seed(0)
    loaded = load_base_model(model_name)
    return with_lora(loaded.model, 8, 16.0, "q_proj,v_proj"), loaded.tokenizer


def training_args(out: Path, a: argparse.Namespace, bf16: bool) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=a.batch, max_steps=a.repeats + 1, learning_rate=LR,
        lr_scheduler_type="constant", weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no",
        logging_steps=10**6, disable_tqdm=True, bf16=bf16, remove_unused_columns=False, optim="adamw_torch",
    )  # fmt: skip


def plain_trainer(turns: Turns, a, tmp: Path, rows: list[dict], bf16: bool) -> Trainer:
    model, tokenizer = lora(a.model)
    data = encode_records(read_records(Dataset.from_list(rows)), tokenizer, a.max_length, "record", "completion")
    tokenized = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in data.examples])
    pad = tokenizer.pad_token_id
    trainer = Trainer(
        model=model, args=training_args(tmp / "plain", a, bf16), train_dataset=tokenized,
        data_collator=lambda batch: collate([_Example(r) for r in batch], pad), callbacks=[Timed(turns, "plain_trainer")],
    )  # fmt: skip
    return trainer


class _Example:
    def __init__(self, row: dict):
        self.input_ids, self.labels = row["input_ids"], row["labels"]


def dp_trainer(turns: Turns, a, tmp: Path, rows: list[dict], bf16: bool) -> DPTrainer:
    model, tokenizer = lora(a.model)
    privacy = PrivacyArguments(
        target_epsilon=1e6, delta=DELTA, noise_multiplier=SIGMA, max_grad_norm=CLIP, expected_batch_size=a.batch,
        max_length=a.max_length,
    )  # fmt: skip
    trainer = DPTrainer(
        model=model, args=training_args(tmp / "dp-trainer", a, bf16), train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer, privacy_args=privacy, callbacks=[Timed(turns, "dp_trainer")],
    )  # fmt: skip
    return trainer


def dpft_run(a, tmp: Path, data: Path, dtype: str) -> recipe.Run:
    config = TrainConfig(
        data=str(data), output=str(tmp / "dpft-train"), model=a.model, batch_size=a.batch, micro_batch_size=a.batch,
        max_steps=a.repeats + 1, lr=LR, max_length=a.max_length, quiet=True, epsilon=1e6, delta=DELTA,
        noise_multiplier=SIGMA, max_grad_norm=CLIP, checkpoint_every=0, dtype=dtype, device="cpu",
        lora_r=8, lora_alpha=16.0, lora_targets="q_proj,v_proj",
    )  # fmt: skip
    return recipe.setup(config)


def run_dpft_train(turns: Turns, run: recipe.Run) -> None:
    run.model.train()
    for t in range(run.planned_steps):
        turns.begin("dpft_train")
        recipe._train_step(run, t)
        turns.end("dpft_train")
    run.step.remove()


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    dtype = dtype_name(resolve_dtype(a.dtype, torch.device("cpu")))
    rows = [r for r in map(json.loads, DATA.read_text().splitlines()) if "prompt" in r][: a.batch]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        os.environ.setdefault("DPFT_LEDGER", str(tmp / "ledger.sqlite"))  # keep the user's ledger clean
        data = tmp / "records.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        turns = Turns(list(VARIANTS))
        # Built one after the other in this thread: loading models concurrently is not thread-safe.
        plain = plain_trainer(turns, a, tmp, rows, dtype == "bf16")
        run = dpft_run(a, tmp, data, dtype)
        dp = dp_trainer(turns, a, tmp, rows, dtype == "bf16")
        jobs = {"plain_trainer": plain.train, "dpft_train": lambda: run_dpft_train(turns, run), "dp_trainer": dp.train}
        errors: dict[str, str] = {}
        threads = [threading.Thread(target=_guarded, args=(turns, n, job, errors)) for n, job in jobs.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise SystemExit(f"failed: {errors}")
    result = {
        "config": {**vars(a), "dtype": dtype, "records": len(rows), "sample_rate": 1.0, "lora": "r=8 q_proj,v_proj"},
        "hardware": describe_hardware("cpu"),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "variants": {n: _figures(s[1:]) for n, s in turns.seconds.items()},  # the first step is the warm-up
    }
    plain = result["variants"]["plain_trainer"]["s_per_step"]
    result["ratios"] = {f"{n}_over_plain_trainer": result["variants"][n]["s_per_step"] / plain for n in VARIANTS}
    print(json.dumps(result, indent=1))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1))
    return result


def _guarded(turns: Turns, name: str, job, errors: dict[str, str]) -> None:
    try:
        job()
    except BaseException as err:  # reported once every thread has stopped
        errors[name] = f"{type(err).__name__}: {err}"
        turns.fail()
    finally:
        turns.leave(name)


def _figures(seconds: list[float]) -> dict[str, float]:
    return {"s_per_step": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "steps": len(seconds)}


if __name__ == "__main__":
    main()
