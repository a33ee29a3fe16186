"""--device: the run computes where it is told; CPU paths are unchanged; CUDA tests skip without CUDA."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import yaml

from dpft.privacy.randomness import Randomness
from dpft.privacy.step import Budget, Mechanism, MemoryJournal, PrivacyStep
from dpft.training import recipe
from dpft.training.config import TrainConfig
from helpers import tiny_llama

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _records(path, n=24):
    path.write_text(
        "".join(json.dumps({"prompt": f"record {i} is", "completion": f" {i % 5}"}) + "\n" for i in range(n))
    )
    return str(path)


def _config(tmp_path, model_dir, device, **extra):
    return TrainConfig(
        data=_records(tmp_path / "d.jsonl"), output=str(tmp_path / f"run-{device}"), model=model_dir, batch_size=6,
        micro_batch_size=4, max_steps=2, max_length=48, quiet=True, epsilon=8.0, delta=1e-3, checkpoint_every=0,
        device=device, dtype="fp32", **extra,
    )  # fmt: skip


def test_cpu_device_run(tmp_path, tiny_model_dir, one_torch_thread):
    report = recipe.train(_config(tmp_path, tiny_model_dir, "cpu"))
    saved = yaml.safe_load((tmp_path / "run-cpu" / "config.yaml").read_text())
    assert report["steps"] == 2 and "device" not in saved  # where it ran is not a run setting


@needs_cuda
@pytest.mark.parametrize("randomness", [Randomness.secure(), Randomness.unsafe_seeded(3)], ids=["secure", "seeded"])
def test_noise_on_cuda_has_std_sigma_c_and_stays_there(randomness):
    model = torch.nn.Linear(256, 256).cuda()
    step = PrivacyStep(model, Mechanism(0.1, 1.0, 1.5, 2.0), Budget(1e-5), randomness, MemoryJournal())
    step.begin(0)
    step.finish()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert grad.device.type == "cuda"
    assert grad.std().item() == pytest.approx(3.0, rel=0.02)


@needs_cuda
def test_cuda_run_trains_on_the_gpu(tmp_path, tiny_model_dir, monkeypatch):
    seen = {}
    original = recipe._train_step

    def spy(run, t):
        seen["device"] = next(p for p in run.model.parameters() if p.requires_grad).device.type
        original(run, t)

    monkeypatch.setattr(recipe, "_train_step", spy)
    report = recipe.train(_config(tmp_path, tiny_model_dir, "cuda", unsafe_seed=1))
    assert seen["device"] == "cuda" and report["steps"] == 2 and report["epsilon"] <= 8.0


@needs_cuda
def test_cuda_bf16_autocast_follows_the_device(tmp_path, tiny_model_dir):
    report = recipe.train(replace(_config(tmp_path, tiny_model_dir, "cuda", unsafe_seed=1), dtype="bf16"))
    assert report["dtype"] == "bf16"


def test_engine_buffers_follow_the_parameters_device():
    model = tiny_llama()
    step = PrivacyStep(model, Mechanism(0.1, 1.0, 1.0, 1.0), Budget(1e-5), Randomness.unsafe_seeded(0), MemoryJournal())
    step.begin(0)
    step.finish()
    assert all(p.grad.device == p.device for p in model.parameters() if p.requires_grad)
    step.remove()
