"""DPTrainer.train(resume_from_checkpoint=True): the journal stays the single source of ε.

A run is interrupted inside a step, after its journal line and its noise (a callback raises before
the optimizer step): that step touched the data and never completed. The resumed run redoes it from
the newest checkpoint, so the journal holds one step more than the steps completed, and privacy.json
reports ε of every journalled step: that of an uninterrupted run with as many steps. Resuming with
other data, settings or randomness is refused before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from dpft.errors import ConfigError
from dpft.hf.budget import dataset_fingerprint
from dpft.ledger import BudgetLedger
from dpft.privacy.accounting import Segment, epsilon_of
from helpers import write_records
from test_hf_trainer import dp_trainer, privacy, records, training_args

SIGMA, Q, DELTA = 1.0, 8 / 40, 1e-3  # σ given: ε depends on the number of steps alone


class Crash(RuntimeError):
    pass


class CrashInStep(TrainerCallback):
    """Raise in step `at` (0-based) after its journal line and noise, before the optimizer step."""

    def __init__(self, at: int):
        self.at = at

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise Crash(f"interrupted in step {self.at}")


def journal_lines(root: Path) -> int:
    return len((root / "private" / "journal.jsonl").read_text().splitlines())


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class LedgerAtStart(TrainerCallback):
    """The run's ledger entry when training starts (before any step reads data)."""

    def __init__(self, fingerprint: str):
        self.fingerprint, self.segments = fingerprint, None

    def on_train_begin(self, args, state, control, **kwargs):
        output = str(Path(args.output_dir).resolve())
        [entry] = [e for e in BudgetLedger().history(self.fingerprint) if e.output == output]
        self.segments = [list(s) for s in entry.segments]


def run(tmp_path, model_dir, name, data, steps=4, crash_at=None, resume=None, priv=None, callbacks=(), **args_extra):
    callbacks = [*callbacks, CrashInStep(crash_at)] if crash_at is not None else list(callbacks)
    args = training_args(tmp_path / name, max_steps=steps, save_strategy="steps", save_steps=1, **args_extra)
    trainer = dp_trainer(
        tmp_path, model_dir, data=data, args=args, priv=priv or privacy(noise_multiplier=SIGMA, target_epsilon=50.0),
        callbacks=callbacks,
    )  # fmt: skip
    if crash_at is not None:
        with pytest.raises(Crash):
            trainer.train()
        return None
    return trainer.train(resume_from_checkpoint=resume)


@pytest.mark.usefixtures("one_torch_thread")
def test_resume_accounts_the_interrupted_step_and_continues_the_run(tmp_path, tiny_model_dir):
    data = records(write_records(tmp_path / "d.jsonl"))
    run(tmp_path, tiny_model_dir, "whole", data, steps=4)
    run(tmp_path, tiny_model_dir, "five", data, steps=5)
    root = tmp_path / "cut"
    run(tmp_path, tiny_model_dir, "cut", data, steps=4, crash_at=2)
    assert journal_lines(root) == 3 and not (root / "privacy.json").exists()  # step 2 touched the data
    assert (root / "private" / "checkpoints" / "latest").read_text() == "step-000002"
    assert not list(root.glob("checkpoint-*"))  # dpft's checkpoints, not the Trainer's public folders
    ledger = LedgerAtStart(dataset_fingerprint(data))
    out = run(tmp_path, tiny_model_dir, "cut", data, steps=4, resume=True, callbacks=[ledger])
    assert ledger.segments == [[Q, SIGMA, 5]]  # 3 journalled + 2 still planned, before any data is read

    report = json.loads((root / "privacy.json").read_text())
    five = json.loads((tmp_path / "five" / "privacy.json").read_text())
    assert journal_lines(root) == 5 and report["steps"] == 5 and out.global_step == 4
    assert report["segments"] == five["segments"] == [[Q, SIGMA, 5]]
    assert report["epsilon"] == five["epsilon"] == pytest.approx(epsilon_of([Segment(Q, SIGMA, 5)], DELTA))
    assert report["epsilon"] > json.loads((tmp_path / "whole" / "privacy.json").read_text())["epsilon"]
    [entry] = [e for e in BudgetLedger().history(dataset_fingerprint(data)) if e.output == str(root.resolve())]
    assert [list(s) for s in entry.segments] == report["segments"]
    # The private and public logs hold each completed step once (the redone step replaced).
    assert [r["step"] for r in rows(root / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in rows(root / "private" / "train-log.jsonl")] == [1, 2, 3, 4]
    assert json.loads((root / "private" / "data.json").read_text())["sampling_check"]["steps_checked"] == 4
    # Seeded: the redone steps draw the batches and noise of the uninterrupted run; with the
    # checkpoint's weights, optimizer and scheduler the result is that run's.
    whole = load_file(tmp_path / "whole" / "model" / "adapter_model.safetensors")
    resumed = load_file(root / "model" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("one_torch_thread")
def test_the_hard_stop_composes_the_steps_of_the_lost_attempt(tmp_path, tiny_model_dir):
    """Target = ε of 4 steps: 3 journalled before the crash (2 completed) leave one step to the resume."""
    data = records(write_records(tmp_path / "d.jsonl"))
    target = epsilon_of([Segment(Q, SIGMA, 4)], DELTA)
    priv = privacy(noise_multiplier=SIGMA, target_epsilon=target)
    run(tmp_path, tiny_model_dir, "run", data, steps=8, crash_at=2, priv=priv)
    out = run(tmp_path, tiny_model_dir, "run", data, steps=8, resume=True, priv=priv)
    report = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert report["stop_reason"].startswith("stopped at the privacy budget")
    assert report["steps"] == journal_lines(tmp_path / "run") == 4 and out.global_step == 3
    assert report["epsilon"] <= target


@pytest.mark.usefixtures("one_torch_thread")
def test_the_hard_stop_composes_the_dataset_budget_with_the_other_runs(tmp_path, tiny_model_dir):
    """2 steps of another run, then 4 planned under a budget of 6 steps (not 7): a crash in the last
    step leaves 4 journalled, and redoing it would make 7 on the dataset. The resume stops instead."""
    data = records(write_records(tmp_path / "d.jsonl"))
    run(tmp_path, tiny_model_dir, "other", data, steps=2)
    eps = [epsilon_of([Segment(Q, SIGMA, n)], DELTA) for n in (6, 7)]
    priv = privacy(noise_multiplier=SIGMA, target_epsilon=50.0, dataset_budget=sum(eps) / 2)
    run(tmp_path, tiny_model_dir, "run", data, steps=4, crash_at=3, priv=priv)  # journal 4, checkpoint at step 3
    ledger = LedgerAtStart(dataset_fingerprint(data))
    out = run(tmp_path, tiny_model_dir, "run", data, steps=4, resume=True, priv=priv, callbacks=[ledger])
    assert ledger.segments == [[Q, SIGMA, 5]]  # the journal's 4 and the 1 still planned, before any data is read
    report = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert (
        report["stop_reason"].startswith("stopped at the privacy budget")
        and "--dataset-budget" in report["stop_reason"]
    )
    assert report["steps"] == journal_lines(tmp_path / "run") == 4 and out.global_step == 3
    spent = BudgetLedger().spend(dataset_fingerprint(data), DELTA)
    assert spent.epsilon == pytest.approx(eps[0]) and spent.epsilon <= priv.dataset_budget


@pytest.mark.usefixtures("one_torch_thread")
def test_resume_refuses_a_journal_shorter_than_the_checkpoint(tmp_path, tiny_model_dir):
    """A journal lost, or restored from an older copy, would undercount ε: refused, nothing rewritten."""
    data = records(write_records(tmp_path / "d.jsonl"))
    run(tmp_path, tiny_model_dir, "run", data, steps=4, crash_at=2)  # 3 steps journalled, checkpoint at step 2
    root = tmp_path / "run"
    journal, metrics = root / "private" / "journal.jsonl", root / "metrics.jsonl"
    rows = metrics.read_text()
    for kept in (1, 0):  # an older copy of the journal, then none at all
        if kept:
            journal.write_text(journal.read_text().splitlines(keepends=True)[0])
        else:
            journal.unlink()
        with pytest.raises(ConfigError, match=f"journal holds {kept} steps but the checkpoint is at step 2"):
            run(tmp_path, tiny_model_dir, "run", data, steps=4, resume=True)
        assert metrics.read_text() == rows and not (root / "privacy.json").exists()
    assert not journal.exists()


@pytest.fixture
def interrupted(tmp_path, tiny_model_dir):
    """A run interrupted in its first step (journalled, no checkpoint yet)."""
    data = records(write_records(tmp_path / "d.jsonl"))
    run(tmp_path, tiny_model_dir, "run", data, crash_at=0)
    return tmp_path / "run", data


@pytest.mark.parametrize(
    ("priv_extra", "args_extra", "needle"),
    [
        ({"max_grad_norm": 0.5}, {}, "PrivacyArguments.max_grad_norm differ"),
        ({"expected_batch_size": 4}, {}, "PrivacyArguments.expected_batch_size differ"),
        ({}, {"learning_rate": 0.5}, "TrainingArguments.learning_rate differ"),
        ({"unsafe_seed": 8}, {}, "unsafe_seed differs"),
        ({"unsafe_seed": None}, {}, "unsafe_seed differs"),
    ],
)
def test_resume_refuses_changed_settings(interrupted, tmp_path, tiny_model_dir, priv_extra, args_extra, needle):
    root, data = interrupted
    before = sorted(p.name for p in root.rglob("*"))
    priv = privacy(**{"noise_multiplier": SIGMA, "target_epsilon": 50.0, **priv_extra})
    args = training_args(root, max_steps=4, save_strategy="steps", save_steps=1, **args_extra)
    trainer = dp_trainer(tmp_path, tiny_model_dir, data=data, args=args, priv=priv)
    with pytest.raises(ConfigError, match=needle):
        trainer.train(resume_from_checkpoint=True)
    assert sorted(p.name for p in root.rglob("*")) == before and journal_lines(root) == 1


def test_resume_refuses_changed_data_and_other_targets(interrupted, tmp_path, tiny_model_dir):
    root, data = interrupted
    changed = data.map(lambda r, i: {"completion": " condition 6"} if i == 0 else {}, with_indices=True)
    with pytest.raises(ConfigError, match="train_dataset differs"):
        run(tmp_path, tiny_model_dir, "run", changed, resume=True)
    with pytest.raises(ConfigError, match="pass True or output_dir"):
        run(tmp_path, tiny_model_dir, "run", data, resume=str(root / "checkpoint-2"))
    with pytest.raises(ConfigError, match=r"already holds a dpft run; .*resume_from_checkpoint=True"):
        run(tmp_path, tiny_model_dir, "run", data)
    with pytest.raises(ConfigError, match="holds no DPTrainer run to resume"):
        run(tmp_path, tiny_model_dir, "empty", data, resume=True)
    assert journal_lines(root) == 1


@pytest.mark.usefixtures("one_torch_thread")
def test_resume_without_a_checkpoint_restarts_and_a_finished_run_is_refused(interrupted, tmp_path, tiny_model_dir):
    root, data = interrupted
    out = run(tmp_path, tiny_model_dir, "run", data, resume=str(root))
    report = json.loads((root / "privacy.json").read_text())
    assert out.global_step == 4 and report["steps"] == journal_lines(root) == 5  # the lost step counts
    with pytest.raises(ConfigError, match="already finished"):
        run(tmp_path, tiny_model_dir, "run", data, resume=True)
