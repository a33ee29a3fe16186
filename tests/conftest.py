"""Shared fixtures; the tiny models themselves are built in `helpers.py`."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from dpft.privacy.sampling import PoissonSampler
from helpers import tiny_gpt2, tiny_llama, tiny_tokenizer


@pytest.fixture
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved tiny Llama (tied embeddings) + tokenizer, loadable by path like any HF model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def _private_ledger(tmp_path, monkeypatch):
    """Every test gets its own budget ledger: tests never touch the user's ~/.cache/dpft."""
    monkeypatch.setenv("DPFT_LEDGER", str(tmp_path / "ledger.sqlite"))


@pytest.fixture
def sampled(monkeypatch):
    """Every Poisson draw of this process, as (step, units)."""
    draws: list[tuple[int, list[int]]] = []
    original = PoissonSampler.sample

    def sample(self, step):
        units = original(self, step)
        draws.append((step, units.tolist()))
        return units

    monkeypatch.setattr(PoissonSampler, "sample", sample)
    return draws


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: torch's thread pool only adds contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
