"""dpft.hf.DPTrainer: the Trainer drop-in runs the same DP-SGD as `dpft train`, refuses what would
void the guarantee, and keeps losses away from trackers."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

import dpft
from dpft.errors import BudgetExceededError, ConfigError
from dpft.hf import DPTrainer, PrivacyArguments
from dpft.hf.budget import dataset_fingerprint
from dpft.hf.trainer import DPTrainerMixin
from dpft.ledger import BudgetLedger
from dpft.models import load_base_model, precision, with_lora
from dpft.privacy.engine import PerUnitClipper
from dpft.privacy.step import PrivacyStep
from dpft.training.loss import example_losses as dpft_example_losses
from helpers import public_files, tiny_tokenizer, write_records
from test_engine import assert_grads_close, clipped_sum, norm_of, reference_unit_grads
from test_gradient_checkpointing import count_recomputations

CLIP = 0.27  # between the smallest and the largest unit norm of the checkpointing test's step
CORE_KEYS = (
    "dp", "epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "expected_batch_size",
    "steps", "planned_steps", "target_epsilon", "accountant", "segments", "sampling", "privacy_unit",
    "max_records_per_user", "num_units", "randomness", "stop_reason", "neighboring_relation",
)  # fmt: skip


def records(path: Path) -> Dataset:
    return Dataset.from_list([json.loads(line) for line in path.read_text().splitlines()])


def lora_model(model_dir: str):
    torch.manual_seed(0)  # as `dpft train` with seed=0: the adapters' initialisation
    loaded = load_base_model(model_dir)
    return with_lora(loaded.model, 8, 16.0, "q_proj,v_proj"), loaded.tokenizer


def training_args(out: Path, **extra) -> TrainingArguments:
    opts = dict(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
        lr_scheduler_type="constant", weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no",
        logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    return TrainingArguments(**{**opts, **extra})


def privacy(**extra) -> PrivacyArguments:
    return PrivacyArguments(
        **{"target_epsilon": 8.0, "delta": 1e-3, "expected_batch_size": 8, "max_length": 64, "unsafe_seed": 7, **extra}
    )


class Recorder(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def dp_trainer(tmp_path, tiny_model_dir, data=None, args=None, priv=None, **kwargs) -> DPTrainer:
    model, tokenizer = lora_model(tiny_model_dir)
    data = data if data is not None else records(write_records(tmp_path / "d.jsonl"))
    return DPTrainer(
        model=model,
        args=args or training_args(tmp_path / "hf"),
        train_dataset=data,
        processing_class=tokenizer,
        privacy_args=priv or privacy(),
        **kwargs,
    )


@pytest.mark.usefixtures("one_torch_thread")
def test_same_batches_epsilon_and_weights_as_dpft_train(tmp_path, tiny_model_dir, sampled):
    data = write_records(tmp_path / "d.jsonl")
    report = dpft.train(
        str(data), str(tmp_path / "cli"), model=tiny_model_dir, batch_size=8, micro_batch_size=4, max_steps=4,
        lr=1e-2, max_length=64, quiet=True, epsilon=8.0, delta=1e-3, checkpoint_every=0, unsafe_seed=7, dtype="fp32",
    )  # fmt: skip
    cli_draws = list(sampled)
    sampled.clear()
    trainer = dp_trainer(tmp_path, tiny_model_dir, data=records(data))
    out = trainer.train()
    assert sampled == cli_draws and len(cli_draws) == 4
    privacy_json = json.loads((tmp_path / "hf" / "privacy.json").read_text())
    assert {k: privacy_json[k] for k in CORE_KEYS} == {k: report[k] for k in CORE_KEYS}
    assert out.metrics["epsilon"] == pytest.approx(report["epsilon"]) and out.training_loss != out.training_loss
    cli = {n: p for n, p in dpft.models.load_run_model(tmp_path / "cli").model.named_parameters()}
    hf = {n: p for n, p in dpft.models.load_run_model(tmp_path / "hf").model.named_parameters()}
    assert cli.keys() == hf.keys()
    base = dict(load_base_model(tiny_model_dir).model.named_parameters())
    assert any(not torch.equal(hf[n], base[n]) for n in hf)  # the steps did train the model
    # Both use torch AdamW, constant lr; only the order of float operations may differ.
    for name in cli:
        torch.testing.assert_close(hf[name], cli[name], rtol=1e-4, atol=1e-5)
    for name in ("metrics.jsonl", "private/journal.jsonl", "model/README.md", "private/train-log.jsonl"):
        assert (tmp_path / "hf" / name).is_file()


@pytest.mark.parametrize(("bound", "fraction"), [(1e-6, 1.0), (1e6, 0.0)])
def test_private_log_has_the_clipped_fraction(tmp_path, tiny_model_dir, bound, fraction):
    dp_trainer(tmp_path, tiny_model_dir, priv=privacy(max_grad_norm=bound)).train()
    rows = [json.loads(r) for r in (tmp_path / "hf" / "private" / "train-log.jsonl").read_text().splitlines()]
    sampled = [r["clipped_fraction"] for r in rows if r["batch_size"]]
    assert sampled and sampled == [fraction] * len(sampled)
    assert "clipped" not in (tmp_path / "hf" / "metrics.jsonl").read_text()


@pytest.mark.parametrize(
    ("args_extra", "priv_extra", "needle"),
    [
        ({"train_sampling_strategy": "group_by_length"}, {}, "group_by_length"),
        ({"gradient_accumulation_steps": 2}, {}, "gradient_accumulation_steps"),
        ({"include_num_input_tokens_seen": "all"}, {}, "include_num_input_tokens_seen"),
        ({"label_smoothing_factor": 0.1}, {}, "label_smoothing_factor"),
        ({"max_steps": 1000}, {"target_epsilon": None, "noise_multiplier": 1.0}, "target_epsilon is required"),
        ({}, {"privacy_unit": "people"}, "privacy_unit"),
        ({"load_best_model_at_end": True, "eval_strategy": "steps", "save_strategy": "steps"}, {}, "newest checkpoint"),
        ({"neftune_noise_alpha": 5.0}, {}, "neftune_noise_alpha"),  # its noise scales with the padded width
    ],
)
def test_unsafe_settings_are_refused(tmp_path, tiny_model_dir, args_extra, priv_extra, needle):
    with pytest.raises(ConfigError, match=needle):
        dp_trainer(
            tmp_path, tiny_model_dir, args=training_args(tmp_path / "hf", **args_extra), priv=privacy(**priv_extra)
        )
    assert not (tmp_path / "hf" / "private").exists()


def test_evaluation_on_the_training_set_is_refused(tmp_path, tiny_model_dir):
    data = records(write_records(tmp_path / "d.jsonl"))
    with pytest.raises(ConfigError, match="eval_dataset is the training set"):
        dp_trainer(tmp_path, tiny_model_dir, data=data, eval_dataset=data)
    with pytest.raises(ConfigError, match="eval_dataset is the training set"):
        dp_trainer(tmp_path, tiny_model_dir, data=data, eval_dataset={"train": data})


def test_a_custom_sampler_or_loss_is_refused(tmp_path, tiny_model_dir):
    class Shuffled(DPTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return None

    model, tokenizer = lora_model(tiny_model_dir)
    data = records(write_records(tmp_path / "d.jsonl"))
    with pytest.raises(ConfigError, match="overrides _get_train_sampler"):
        Shuffled(model=model, args=training_args(tmp_path / "hf"), train_dataset=data, processing_class=tokenizer)
    with pytest.raises(ConfigError, match="compute_loss_func"):
        dp_trainer(tmp_path, tiny_model_dir, data=data, compute_loss_func=lambda *a, **k: 0)

    class Wrapped(DPTrainer):  # e.g. to put DDP back: its hooks would all-reduce unclipped gradients
        def _prepare_for_training(self, *args):
            return Trainer._prepare_for_training(self, *args)

    with pytest.raises(ConfigError, match="overrides _prepare_for_training"):
        Wrapped(model=model, args=training_args(tmp_path / "hf"), train_dataset=data, processing_class=tokenizer)


def test_a_micro_batch_smaller_than_a_user_is_refused(tmp_path, tiny_model_dir):
    args = training_args(tmp_path / "hf", per_device_train_batch_size=2)
    with pytest.raises(ConfigError, match="micro-batch"):
        dp_trainer(tmp_path, tiny_model_dir, args=args, priv=privacy(privacy_unit="user", max_records_per_user=4))


def test_packing_and_neftune_are_refused_for_sft(tmp_path, tiny_model_dir):
    trl = pytest.importorskip("trl")
    from dpft.hf import DPSFTTrainer

    model, tokenizer = lora_model(tiny_model_dir)
    config = trl.SFTConfig(output_dir=str(tmp_path / "sft"), packing=True, report_to=[], use_cpu=True)
    with pytest.raises(ConfigError, match="packing"):
        DPSFTTrainer(model=model, args=config, train_dataset=records(write_records(tmp_path / "d.jsonl")),
                     processing_class=tokenizer, privacy_args=privacy())  # fmt: skip
    config = trl.SFTConfig(output_dir=str(tmp_path / "sft"), neftune_noise_alpha=5.0, report_to=[], use_cpu=True)
    with pytest.raises(ConfigError, match="neftune_noise_alpha"):
        DPSFTTrainer(model=model, args=config, train_dataset=records(write_records(tmp_path / "d.jsonl")),
                     processing_class=tokenizer, privacy_args=privacy())  # fmt: skip
    config = trl.SFTConfig(output_dir=str(tmp_path / "sft"), report_to=[], use_cpu=True)
    with pytest.raises(ConfigError, match="formatting_func"):
        DPSFTTrainer(model=model, args=config, train_dataset=records(write_records(tmp_path / "d.jsonl")),
                     processing_class=tokenizer, privacy_args=privacy(), formatting_func=lambda r: r["prompt"])  # fmt: skip


@pytest.mark.usefixtures("one_torch_thread")
def test_trackers_see_no_loss_unless_opted_in(tmp_path, tiny_model_dir):
    recorder = Recorder()
    trainer = dp_trainer(tmp_path, tiny_model_dir, callbacks=[recorder])
    trainer.train()
    keys = {k for logs in recorder.logs for k in logs}
    assert recorder.logs and {"epsilon", "learning_rate"} <= keys
    assert not any("loss" in k or "grad_norm" in k or "tokens" in k for k in keys), keys
    assert all("loss" not in str(entry) for entry in trainer.state.log_history)
    eps = [logs["epsilon"] for logs in recorder.logs if "learning_rate" in logs]
    assert eps == sorted(eps) and eps[-1] <= 8.0

    opted = Recorder()
    args = training_args(tmp_path / "hf2", max_steps=2)
    trainer = dp_trainer(
        tmp_path, tiny_model_dir, args=args, priv=privacy(log_private_diagnostics=True), callbacks=[opted]
    )
    out = trainer.train()
    assert any("loss" in logs for logs in opted.logs) and out.training_loss == out.training_loss


@pytest.mark.usefixtures("one_torch_thread")
def test_hard_stop_at_the_budget_and_user_level(tmp_path, tiny_model_dir):
    """σ given: the run stops when one more step would pass the target, as `dpft train` does."""
    priv = privacy(
        noise_multiplier=1.0, target_epsilon=2.0, expected_batch_size=2, privacy_unit="user", max_records_per_user=2
    )
    trainer = dp_trainer(tmp_path, tiny_model_dir, args=training_args(tmp_path / "hf", max_steps=200), priv=priv)
    out = trainer.train()
    report = json.loads((tmp_path / "hf" / "privacy.json").read_text())
    assert report["stop_reason"].startswith("stopped at the privacy budget")
    assert 0 < report["steps"] == out.global_step < 200 and report["epsilon"] <= 2.0
    assert report["privacy_unit"] == "user" and report["num_units"] == 10
    journal = (tmp_path / "hf" / "private" / "journal.jsonl").read_text().splitlines()
    assert len(journal) == report["steps"]


@pytest.mark.usefixtures("one_torch_thread")
def test_evaluation_on_held_out_records_during_training(tmp_path, tiny_model_dir):
    recorder = Recorder()
    held_out = records(write_records(tmp_path / "held.jsonl", n=8))
    args = training_args(
        tmp_path / "hf", max_steps=2, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4
    )
    dp_trainer(tmp_path, tiny_model_dir, args=args, eval_dataset=held_out, callbacks=[recorder]).train()
    evals = [logs for logs in recorder.logs if "eval_loss" in logs]
    assert len(evals) == 2 and all("epsilon" in logs for logs in evals)
    assert (tmp_path / "hf" / "privacy.json").is_file()


# ---- the dataset budget ledger, public/private files, guards ----


@pytest.mark.usefixtures("one_torch_thread")
def test_ledger_records_the_run_settings_are_public_and_the_seed_is_not(tmp_path, tiny_model_dir, monkeypatch):
    data = records(write_records(tmp_path / "d.jsonl"))
    fingerprint = dataset_fingerprint(data)
    recorded: list[tuple] = []
    original = BudgetLedger.record_run

    def record_run(self, fp, entry):
        journal = tmp_path / "hf" / "private" / "journal.jsonl"
        recorded.append((entry.segments, journal.is_file() and journal.read_text() != ""))
        return original(self, fp, entry)

    monkeypatch.setattr(BudgetLedger, "record_run", record_run)
    priv = privacy(unsafe_seed=48151623, dataset_budget=50.0)
    dp_trainer(tmp_path, tiny_model_dir, data=data, priv=priv).train()
    root = tmp_path / "hf"
    report = json.loads((root / "privacy.json").read_text())
    [entry] = BudgetLedger().history(fingerprint)
    assert [list(s) for s in entry.segments] == report["segments"] and report["steps"] == 4
    assert entry.dp and entry.epsilon == pytest.approx(report["epsilon"]) and entry.output == str(root.resolve())
    assert (entry.privacy_unit, entry.max_records_per_user) == ("record", None)
    # A user-level run under a dataset budget is refused: the ledger cannot add a record-level ε to it.
    user = privacy(dataset_budget=50.0, privacy_unit="user", max_records_per_user=2)
    with pytest.raises(BudgetExceededError, match=r"privacy unit 'user': run \w+ on this dataset is 'record'-level"):
        dp_trainer(tmp_path, tiny_model_dir, data=data, args=training_args(tmp_path / "user"), priv=user)
    # First the planned spend, before any step was journaled (no data read); then the journal's.
    assert recorded[0][1] is False and [list(s) for s in recorded[0][0]] == report["segments"]
    assert [list(s) for s in recorded[-1][0]] == report["segments"]
    state = json.loads((root / "private" / "state.json").read_text())
    assert state["data"] == fingerprint and state["unsafe_seed"] == 48151623
    settings = json.loads((root / "dpft-trainer.json").read_text())
    assert "unsafe_seed" not in settings["privacy"] and settings["privacy"]["dataset_budget"] == 50.0
    assert settings["training"]["learning_rate"] == 1e-2 and settings["training"]["max_steps"] == 4
    assert settings["training"]["per_device_train_batch_size"] == 4
    assert settings["training"]["lr_scheduler_type"] == "constant"
    files = public_files(root)
    assert root / "dpft-trainer.json" in files and root / "privacy.json" in files
    for f in files:
        assert b"48151623" not in f.read_bytes(), f


def test_fingerprint_is_of_the_rows_not_the_object(tmp_path):
    rows = [json.loads(line) for line in write_records(tmp_path / "d.jsonl").read_text().splitlines()]
    reordered = [{k: r[k] for k in reversed(list(r))} for r in rows]
    assert dataset_fingerprint(Dataset.from_list(rows)) == dataset_fingerprint(Dataset.from_list(reordered))
    assert dataset_fingerprint(Dataset.from_list(rows)) == dataset_fingerprint(rows)
    assert dataset_fingerprint(Dataset.from_list(rows).with_format("numpy")) == dataset_fingerprint(rows)
    sparse = [{k: v for k, v in r.items() if k != "user_id" or i} for i, r in enumerate(rows)]
    assert dataset_fingerprint(sparse) == dataset_fingerprint([dict(rows[0], user_id=None), *rows[1:]])
    changed = [dict(rows[0], completion=" condition 6"), *rows[1:]]
    assert dataset_fingerprint(changed) != dataset_fingerprint(rows)


def test_a_run_over_the_dataset_budget_is_refused_before_anything_is_written(tmp_path, tiny_model_dir):
    data = records(write_records(tmp_path / "d.jsonl"))
    with pytest.raises(BudgetExceededError, match="dataset-budget"):
        dp_trainer(tmp_path, tiny_model_dir, data=data, priv=privacy(dataset_budget=1.0))
    assert not (tmp_path / "hf").exists()
    assert BudgetLedger().history(dataset_fingerprint(data)) == []


@pytest.mark.usefixtures("one_torch_thread")
def test_the_budget_is_checked_again_when_training_starts(tmp_path, tiny_model_dir):
    """Two trainers built on the same data: the second one is refused once the first has spent."""
    data = records(write_records(tmp_path / "d.jsonl"))
    priv = privacy(dataset_budget=9.0)
    first = dp_trainer(tmp_path, tiny_model_dir, data=data, args=training_args(tmp_path / "a"), priv=priv)
    second = dp_trainer(tmp_path, tiny_model_dir, data=data, args=training_args(tmp_path / "b"), priv=priv)
    first.train()
    with pytest.raises(BudgetExceededError, match="dataset-budget"):
        second.train()
    assert list((tmp_path / "b").iterdir()) == []
    assert [e.output for e in BudgetLedger().history(dataset_fingerprint(data))] == [str((tmp_path / "a").resolve())]


class Spy:
    """The micro-batches DPTrainer clips in its one step, and the pre-noise clipped sums."""

    def __init__(self, monkeypatch):
        self.batches: list[dict] = []
        self.units: list[torch.Tensor] = []
        self.sums: list[dict] = []
        losses, backward, take = DPTrainerMixin.example_losses, PrivacyStep.backward, PerUnitClipper.take_sums

        def example_losses(trainer, model, batch):
            self.batches.append({k: v.clone() for k, v in batch.items()})
            return losses(trainer, model, batch)

        def step_backward(step, losses, unit_index):
            self.units.append(unit_index.clone())
            return backward(step, losses, unit_index)

        def take_sums(clipper):
            sums = take(clipper)
            self.sums.append({n: s.clone() for n, s in sums.items()})
            return sums

        monkeypatch.setattr(DPTrainerMixin, "example_losses", example_losses)
        monkeypatch.setattr(PrivacyStep, "backward", step_backward)
        monkeypatch.setattr(PerUnitClipper, "take_sums", take_sums)


def hf_losses(model, ids, mask, labels):
    return dpft_example_losses(model(input_ids=ids, attention_mask=mask).logits, labels)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("name", ["gradient_checkpointing", "activation_checkpointing"])
def test_gradient_checkpointing_clips_as_the_per_unit_loop(tmp_path, tiny_model_dir, monkeypatch, name, reentrant):
    """With the Trainer's checkpointing on (TRL's default), the blocks are recomputed in the backward
    and the clipped sum of the step is still the explicit loop's, one unit at a time, without it."""
    kwargs = {f"{name}_kwargs": {"use_reentrant": reentrant}}
    args = training_args(tmp_path / "hf", max_steps=1, **{name: True}, **kwargs)
    trainer = dp_trainer(tmp_path, tiny_model_dir, args=args, priv=privacy(max_grad_norm=CLIP))
    spy = Spy(monkeypatch)  # after the model probe (its dummy batch has a clipped sum of its own)
    calls = count_recomputations(trainer.model)
    trainer.train()
    assert trainer.model.is_activation_checkpointing
    assert spy.batches and calls["block"] == len(spy.batches) and calls["inner"] == 2 * calls["block"]  # recomputed

    reference, _ = lora_model(tiny_model_dir)  # the same initial weights, no checkpointing
    batches = [
        (b["input_ids"], b["attention_mask"], b["labels"], u) for b, u in zip(spy.batches, spy.units, strict=True)
    ]
    unit_grads = reference_unit_grads(reference.train(), batches, hf_losses)
    norms = [float(norm_of(g)) for g in unit_grads]
    assert min(norms) < CLIP < max(norms)  # some units clipped, some not
    [sums] = spy.sums
    assert_grads_close(sums, clipped_sum(unit_grads, CLIP), 1e-4)


def test_bf16_only_where_native_and_fp16_never(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": False)
    with pytest.raises(ConfigError, match="bf16=True: cpu has no native bf16"):
        dp_trainer(tmp_path, tiny_model_dir, args=training_args(tmp_path / "hf", bf16=True))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # bf16 unset: accelerate's autocast all the same
    with pytest.raises(ConfigError, match="ACCELERATE_MIXED_PRECISION=bf16: cpu has no native bf16"):
        dp_trainer(tmp_path, tiny_model_dir, args=training_args(tmp_path / "hf"))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": True)
    trainer = dp_trainer(tmp_path, tiny_model_dir, args=training_args(tmp_path / "hf", bf16=True))
    assert trainer.public_settings()["training"]["bf16"] is True
    args = training_args(tmp_path / "hf2")
    args.fp16 = True  # TrainingArguments may refuse fp16 on CPU itself; dpft must refuse it anywhere
    with pytest.raises(ConfigError, match="fp16=True"):
        dp_trainer(tmp_path, tiny_model_dir, args=args)


@pytest.mark.parametrize("mode", ["fp8", "fp16"])
def test_accelerates_mixed_precision_from_the_environment_is_refused(tmp_path, tiny_model_dir, monkeypatch, mode):
    """fp16 and bf16 unset: transformers 5 reads ACCELERATE_MIXED_PRECISION into args.mixed_precision and
    hands it to accelerate (fp16: a loss scaler after the noise; fp8: nn.Linear swapped after the attach)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", mode)
    args = training_args(tmp_path / "hf")
    assert not args.fp16 and not args.bf16
    with pytest.raises(ConfigError, match=f"ACCELERATE_MIXED_PRECISION .*= {mode}:"):
        dp_trainer(tmp_path, tiny_model_dir, args=args)
    assert not (tmp_path / "hf").exists()


class TokenMajorLM(nn.Module):
    """A causal LM whose trainable Linear sees the batch's rows token-major, (T·B, d): the engine's
    per-example norms come out wrong (one unit moved the clipped sum by 1.59·C)."""

    def __init__(self, vocab: int = 128, width: int = 8):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(vocab, width), nn.Linear(width, width), nn.Linear(width, vocab)
        self.emb.requires_grad_(False)
        self.head.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        h = self.emb(input_ids)
        b, t, d = h.shape
        rows = self.mid(h.transpose(0, 1).reshape(t * b, d))
        return SimpleNamespace(logits=self.head(torch.tanh(rows.view(t, b, d).transpose(0, 1))))


def test_a_model_the_engine_cannot_clip_is_refused_before_the_ledger_and_the_run(tmp_path):
    """The probe of `dpft train` (models/probe.py) runs in the Trainer's planning too, before the
    ledger check (a budget that the run would pass is not what is reported) and before any file."""
    data = records(write_records(tmp_path / "d.jsonl"))
    args = training_args(tmp_path / "hf")
    with pytest.raises(ConfigError, match=r"'mid\.weight': dpft's per-unit gradients disagree"):
        DPTrainer(model=TokenMajorLM(), args=args, train_dataset=data, processing_class=tiny_tokenizer(),
                  privacy_args=privacy(dataset_budget=1.0))  # fmt: skip
    assert not (tmp_path / "hf").exists()
    assert BudgetLedger().history(dataset_fingerprint(data)) == []
