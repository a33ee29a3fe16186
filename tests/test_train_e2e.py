"""End-to-end training on a tiny model: the run directory contract, --no-dp, the budget stop, resume."""

from __future__ import annotations

import json

import pytest
import torch

import dpft
from dpft.errors import CheckpointError, DpftError
from dpft.models import load_run_model
from dpft.privacy.accounting import compute_epsilon
from dpft.training import recipe
from helpers import write_records

PRIVACY_KEYS = {
    "epsilon",
    "delta",
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "expected_batch_size",
    "steps",
    "accountant",
    "sampling",
    "neighboring_relation",
    "privacy_unit",
    "num_units",
    "dp",
}


def base_options(tiny_model_dir: str, **extra):
    opts = dict(
        model=tiny_model_dir,
        batch_size=8,
        micro_batch_size=4,
        max_steps=6,
        lr=1e-2,
        max_length=64,
        quiet=True,
        epsilon=8.0,
        delta=1e-3,
        checkpoint_every=0,
    )
    return {**opts, **extra}


def test_dp_run_writes_the_contract(tmp_path, tiny_model_dir):
    data = write_records(tmp_path / "d.jsonl")
    report = dpft.train(str(data), str(tmp_path / "run"), **base_options(tiny_model_dir))
    run = tmp_path / "run"
    privacy = json.loads((run / "privacy.json").read_text())
    assert set(privacy) >= PRIVACY_KEYS
    assert privacy == json.loads(json.dumps(report))
    assert privacy["dp"] is True and privacy["sampling"] == "poisson" and privacy["steps"] == 6
    assert privacy["neighboring_relation"] == "add_or_remove_one"  # what ε is about; N is public, not protected
    assert privacy["sample_rate"] == pytest.approx(8 / 40)
    expected = compute_epsilon(privacy["sample_rate"], privacy["noise_multiplier"], 6, 1e-3)
    assert privacy["epsilon"] == pytest.approx(expected) and privacy["epsilon"] <= 8.0
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["epsilon"] > 0 for r in rows) and rows[-1]["epsilon"] == pytest.approx(privacy["epsilon"])
    assert (run / "config.yaml").is_file() and "differential privacy" in (run / "model" / "README.md").read_text()
    loaded = load_run_model(run)
    assert loaded.model(**loaded.tokenizer("record 1", return_tensors="pt")).logits.ndim == 3


def test_lr_schedule_is_applied_and_logged(tmp_path, tiny_model_dir):
    data = write_records(tmp_path / "d.jsonl")
    opts = base_options(tiny_model_dir, no_dp=True, lr_schedule="linear", warmup_steps=2)
    dpft.train(str(data), str(tmp_path / "run"), **opts)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 7.5e-3, 5e-3, 2.5e-3])


def test_user_level_units(tmp_path, tiny_model_dir):
    data = write_records(tmp_path / "d.jsonl", n=40, users=10)
    report = dpft.train(
        str(data), str(tmp_path / "run"), **base_options(tiny_model_dir, privacy_unit="user", batch_size=4, delta=1e-2)
    )
    assert report["privacy_unit"] == "user" and report["num_units"] == 10
    assert report["sample_rate"] == pytest.approx(4 / 10)


def test_no_dp_baseline(tmp_path, tiny_model_dir):
    data = write_records(tmp_path / "d.jsonl")
    report = dpft.train(str(data), str(tmp_path / "run"), **base_options(tiny_model_dir, no_dp=True))
    assert report["dp"] is False and report["epsilon"] is None and report["steps"] == 6
    assert report["neighboring_relation"] is None  # no accounting, no relation
    assert "No privacy guarantee" in (tmp_path / "run" / "model" / "README.md").read_text()


def test_budget_hard_stop(tmp_path, tiny_model_dir):
    data = write_records(tmp_path / "d.jsonl")
    # σ fixed and small, ε capped: the run must stop before the cap is crossed.
    report = dpft.train(
        str(data),
        str(tmp_path / "run"),
        **base_options(tiny_model_dir, noise_multiplier=0.8, epsilon=3.0, max_steps=50),
    )
    assert report["steps"] < 50 and report["epsilon"] <= 3.0
    q, sigma = report["sample_rate"], report["noise_multiplier"]
    assert compute_epsilon(q, sigma, report["steps"] + 1, 1e-3) > 3.0  # one more step would exceed
    assert "budget" in report["stop_reason"]


def test_existing_output_is_refused(tmp_path, tiny_model_dir):
    data = write_records(tmp_path / "d.jsonl")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("precious")
    with pytest.raises(DpftError, match="not empty"):
        dpft.train(str(data), str(tmp_path / "run"), **base_options(tiny_model_dir))
    assert (tmp_path / "run" / "keep.txt").read_text() == "precious"


class Crash(Exception):
    pass


def test_resume_after_crash_accounts_every_step(tmp_path, tiny_model_dir, monkeypatch):
    data = write_records(tmp_path / "d.jsonl")
    run = tmp_path / "run"
    real_step, calls = recipe._train_step, {"n": 0}

    def crashing_step(*args, **kwargs):
        calls["n"] += 1
        out = real_step(*args, **kwargs)  # the noisy update of step 5 happens, then the crash
        if calls["n"] == 5:
            raise Crash
        return out

    monkeypatch.setattr(recipe, "_train_step", crashing_step)
    with pytest.raises(Crash):
        # σ given without a target ε: no budget stop, so all planned steps are (re)done
        dpft.train(
            str(data), str(run), **base_options(tiny_model_dir, checkpoint_every=2, epsilon=None, noise_multiplier=1.0)
        )
    monkeypatch.setattr(recipe, "_train_step", real_step)
    assert not (run / "privacy.json").exists()  # an interrupted run is never presented as complete
    report = dpft.train("", "", resume=str(run), quiet=True)
    # checkpoint at step 4; step 5 touched the data before the crash and is redone: 7 steps in all
    assert report["steps"] == 7
    assert report["epsilon"] == pytest.approx(
        compute_epsilon(report["sample_rate"], report["noise_multiplier"], 7, 1e-3)
    )
    steps = [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_tampered_checkpoint_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    data = write_records(tmp_path / "d.jsonl")
    run = tmp_path / "run"

    def crash(*args, **kwargs):
        raise Crash

    dpft.train(str(data), str(run), **base_options(tiny_model_dir, checkpoint_every=3, max_steps=3))
    (run / "privacy.json").unlink()
    latest = run / "private" / "checkpoints" / (run / "private" / "checkpoints" / "latest").read_text().strip()
    blob = bytearray((latest / "weights.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (latest / "weights.safetensors").write_bytes(bytes(blob))
    monkeypatch.setattr(recipe, "_train_step", crash)
    with pytest.raises(CheckpointError, match="checksum"):
        dpft.train("", "", resume=str(run), quiet=True)


def test_lora_layers_adapts_only_the_last_blocks(tmp_path, tiny_model_dir):
    from dpft.models.loading import with_lora
    from helpers import tiny_gpt2, tiny_llama

    for model in (tiny_llama(), tiny_gpt2()):
        adapted = with_lora(model, 4, 8, "all-linear", last_layers=1)
        names = [n for n, p in adapted.named_parameters() if p.requires_grad]
        assert names and all(".1." in n for n in names), names
    with pytest.raises(DpftError, match="between 1 and 2"):
        with_lora(tiny_llama(), 4, 8, "all-linear", last_layers=3)
    data = write_records(tmp_path / "d.jsonl")
    report = dpft.train(str(data), str(tmp_path / "run"), **base_options(tiny_model_dir, lora_layers=1))
    assert report["steps"] == 6


def test_frozen_prefix_cache_trains_the_same_weights(tmp_path, tiny_model_dir, monkeypatch):
    """--lora-layers: the recipe reuses the frozen blocks' outputs; same seeded run, same weights."""
    from safetensors.torch import load_file

    data = write_records(tmp_path / "d.jsonl")
    opts = base_options(tiny_model_dir, lora_layers=1, unsafe_seed=5, privacy_unit="user", batch_size=4, delta=1e-2)
    built = []
    real = recipe.PrefixCache.build
    monkeypatch.setattr(recipe.PrefixCache, "build", lambda *a, **k: built.append(1) or real(*a, **k))
    dpft.train(str(data), str(tmp_path / "cached"), **opts)
    assert built, "the recipe did not use the prefix cache"
    monkeypatch.setattr(recipe, "PREFIX_CACHE_BYTES", 0)
    dpft.train(str(data), str(tmp_path / "full"), **opts)
    cached, full = (load_file(tmp_path / r / "model" / "adapter_model.safetensors") for r in ("cached", "full"))
    for name in full:
        torch.testing.assert_close(cached[name], full[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("bound", "fraction"), [(1e-6, 1.0), (1e6, 0.0)])
def test_private_log_has_the_clipped_fraction(tmp_path, tiny_model_dir, bound, fraction):
    data = write_records(tmp_path / "d.jsonl")
    dpft.train(str(data), str(tmp_path / "run"), **base_options(tiny_model_dir, max_grad_norm=bound, max_steps=3))
    rows = [json.loads(r) for r in (tmp_path / "run" / "private" / "train-log.jsonl").read_text().splitlines()]
    assert [r["clipped_fraction"] for r in rows if r["batch_size"]] == [fraction] * sum(
        bool(r["batch_size"]) for r in rows
    )
    assert all(
        "clipped" not in r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    )
