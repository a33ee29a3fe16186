"""Gradient checkpointing (--gradient-checkpointing): the engine still equals the explicit per-unit loop.

With checkpointing, a block's forward runs twice: once in the forward pass and again in the backward
(its activations are recomputed, with the engine's patched forwards). Every capture must still be
counted exactly once:

- non-reentrant (torch's default, what dpft enables): the recomputed forward only refills the saved
  tensors of the original graph; the capturing backward runs once, on the original nodes;
- reentrant: the original forward ran without a graph; the capturing backward runs once, on the
  recomputed graph.

The recomputed forward runs without the model's hooks, so the engine holds the micro-batch's size for
the whole backward: a (1, T) lookup shared by the batch (GPT-2 positions) inside a checkpointed block
is expanded per example in the recomputation as in the forward (`test_shared_position_lookup_*`).

Mutation check (done by hand when this file was written): make the engine count one capture twice,
e.g. `captures = list(self._captures); captures.append(captures[0])` in `PerUnitClipper.backward`:
`test_checkpointed_engine_matches_loop` fails for every model and variant (the duplicated layer's
squared norm is counted four times through the shared-parameter cross term, so the per-unit norms
are off by far more than 1e-4), as do the `Shared`/`Norms` and position-lookup tests, and
`test_train_step_with_gradient_checkpointing` (dpft's probe refuses the model). Dropping a capture
instead (`captures.pop()`) fails the same engine tests on the clipped sum. Reverting the engine's
batch size during the backward makes `test_shared_position_lookup_inside_a_checkpoint` fail
(torch's CheckpointError for non-reentrant, dpft's ConfigError on the (1, T) rows for reentrant).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dpft.training import recipe
from dpft.training.config import TrainConfig
from helpers import trainable
from test_engine import (
    MODELS,
    RECORDS,
    USERS,
    Norms,
    Shared,
    assert_grads_close,
    check_against_reference,
    clipped_sum,
    make_batch,
    norm_of,
    reference_unit_grads,
    run_engine,
    shared_losses,
)

VARIANTS = {"non-reentrant": False, "reentrant": True}


def no_dropout(model: nn.Module) -> nn.Module:
    """Train mode (checkpointing only acts in training) without dropout: one forward = the next."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.train()


def checkpointed(model: nn.Module, reentrant: bool) -> nn.Module:
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    return no_dropout(model)


def count_recomputations(model: nn.Module) -> dict[str, int]:
    """Calls of the first block (hooks stay outside the checkpoint) and of a module inside it."""
    block = next(m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block")))
    inner = next(m for m in block.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
    calls = {"block": 0, "inner": 0}
    block.register_forward_hook(lambda *_: calls.__setitem__("block", calls["block"] + 1))
    inner.register_forward_hook(lambda *_: calls.__setitem__("inner", calls["inner"] + 1))
    return calls


@pytest.mark.parametrize("units", [RECORDS, USERS], ids=["record", "user"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", ["lora-qv", "lora-all-linear", "llama-tied", "gpt2"])
def test_checkpointed_engine_matches_loop(name: str, variant: str, units: list[int], one_torch_thread) -> None:
    """Norms and clipped sum with checkpointing == the per-unit loop without it (rtol 1e-4)."""
    batches = [make_batch(units, seed=1), make_batch([0, 1, 1, 2], seed=2, length=9)]
    plain = no_dropout(MODELS[name]())
    unit_grads = reference_unit_grads(plain, batches)
    want_norms = torch.stack([norm_of(g) for g in unit_grads])
    c = float(want_norms.median())  # some units clipped, some not

    model = checkpointed(MODELS[name](), VARIANTS[variant])
    calls = count_recomputations(model)
    grads, norms = run_engine(model, batches, c)
    assert calls["block"] == 2 and calls["inner"] == 4  # each micro-batch: forward + recomputation

    torch.testing.assert_close(norms, want_norms, rtol=1e-4, atol=0)
    assert_grads_close(grads, clipped_sum(unit_grads, c), 1e-4)
    unchecked, unchecked_norms = run_engine(no_dropout(MODELS[name]()), batches, c)
    torch.testing.assert_close(norms, unchecked_norms, rtol=1e-5, atol=0)
    assert_grads_close(grads, unchecked, 1e-5)


class CheckpointedShared(Shared):
    """Shared's modules called twice (one call inside the checkpoint, one outside) and tied weights."""

    reentrant = False

    def forward(self, ids: Tensor) -> Tensor:
        body = lambda h: self.lin(torch.tanh(self.lin(self.norm(h))))  # noqa: E731
        return self.head(self.norm(checkpoint(body, self.emb(ids), use_reentrant=self.reentrant)))


class CheckpointedNorms(Norms):
    """Norm rules and the generic torch.func rule inside a checkpoint."""

    reentrant = False

    def forward(self, ids: Tensor) -> Tensor:
        body = lambda h: self.scale(self.gemma(self.ln(self.rms(h))))  # noqa: E731
        return self.head(checkpoint(body, self.emb(ids), use_reentrant=self.reentrant))


@pytest.mark.parametrize("units", [RECORDS, USERS], ids=["record", "user"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cls", [CheckpointedShared, CheckpointedNorms], ids=["shared", "norms"])
def test_every_rule_inside_a_checkpoint(cls: type, variant: str, units: list[int]) -> None:
    model = cls()
    model.reentrant = VARIANTS[variant]
    ids = torch.randint(0, 10, (len(units), 5), generator=torch.Generator().manual_seed(0))
    check_against_reference(model, [(ids, torch.tensor(units))], shared_losses)


class Positions(nn.Module):
    """A (1, T) position lookup shared by the batch inside a checkpointed block, as GPT-2's wpe."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos, self.lin = nn.Embedding(10, 6), nn.Embedding(8, 6), nn.Linear(6, 10)
        self.reentrant = reentrant

    def block(self, h: Tensor) -> Tensor:
        return self.lin(torch.tanh(h + self.pos(torch.arange(h.shape[1])[None])))

    def forward(self, ids: Tensor) -> Tensor:
        return checkpoint(self.block, self.tok(ids), use_reentrant=self.reentrant)


@pytest.mark.parametrize("units", [RECORDS, USERS], ids=["record", "user"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shared_position_lookup_inside_a_checkpoint(variant: str, units: list[int]) -> None:
    ids = torch.randint(0, 10, (len(units), 5), generator=torch.Generator().manual_seed(0))
    check_against_reference(Positions(VARIANTS[variant]), [(ids, torch.tensor(units))], shared_losses)


def test_batch_size_is_forgotten_after_the_backward() -> None:
    from dpft.privacy.engine import PerUnitClipper

    model = Positions(reentrant=False)
    clipper = PerUnitClipper(model, 1.0)
    ids = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(0))
    clipper.backward(shared_losses(model, ids), torch.arange(3))
    assert clipper._batch_size is None  # a later call of a submodule alone sees no stale size
    clipper.remove()


def _records(path, n=24) -> str:
    path.write_text(
        "".join(json.dumps({"prompt": f"record {i} is", "completion": f" {i % 5}"}) + "\n" for i in range(n))
    )
    return str(path)


def _train(tmp_path, model_dir: str, name: str, monkeypatch, **extra) -> tuple[dict, dict, dict[str, Tensor]]:
    """One seeded DP step; returns the report, the hook counts and the trained parameters."""
    seen: dict = {}
    setup = recipe.setup

    def spy(config: TrainConfig) -> recipe.Run:
        run = setup(config)
        seen["calls"] = count_recomputations(run.model)
        seen["model"] = run.model
        return run

    monkeypatch.setattr(recipe, "setup", spy)
    config = TrainConfig(
        data=_records(tmp_path / "d.jsonl"), output=str(tmp_path / name), model=model_dir, batch_size=8,
        micro_batch_size=4, max_steps=1, max_length=48, quiet=True, epsilon=8.0, delta=1e-3, checkpoint_every=0,
        dtype="fp32", unsafe_seed=7, lr=0.1, **extra,
    )  # fmt: skip
    report = recipe.train(config)
    params = {n: p.detach().clone() for n, p in trainable(seen["model"]).items()}
    return report, seen["calls"], params


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_train_step_with_gradient_checkpointing(tmp_path, tiny_model_dir, monkeypatch, one_torch_thread, full):
    """`dpft.train(gradient_checkpointing=True)` recomputes the blocks and takes the same step."""
    report, calls, params = _train(tmp_path, tiny_model_dir, "gc", monkeypatch, gradient_checkpointing=True, full=full)
    assert report["steps"] == 1 and calls["block"] > 0
    assert calls["inner"] == 2 * calls["block"]  # every micro-batch's block ran again in the backward
    _, plain_calls, plain_params = _train(tmp_path, tiny_model_dir, "plain", monkeypatch, full=full)
    assert plain_calls["inner"] == plain_calls["block"] == calls["block"]
    assert_grads_close(params, plain_params, 1e-5)  # same seeded Poisson draw and noise: same weights
