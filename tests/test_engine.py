"""Invariant 1: the engine's per-unit norms and clipped sum equal a loop of single-unit backwards."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Qwen2Config, Qwen2ForCausalLM

from dpft.errors import ConfigError
from dpft.privacy.engine import PerUnitClipper, PlainAccumulator, make_accumulator
from dpft.privacy.rules import linear
from helpers import VOCAB, tiny_gpt2, tiny_llama, trainable, write_grads

Batch = tuple[Tensor, Tensor, Tensor, Tensor]  # ids, attention_mask, labels, unit_index
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    pad_token_id=0,
)


def tiny_qwen2() -> nn.Module:
    torch.manual_seed(0)  # tied embeddings and q/k/v biases
    return Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True))


def tiny_neox() -> nn.Module:
    torch.manual_seed(0)  # LayerNorm with bias, fused qkv, untied embed_out
    return GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL))


def lora(target: list[str] | str) -> nn.Module:
    # init_lora_weights=False: B starts random, so A's gradient is not zero
    config = LoraConfig(r=4, target_modules=target, init_lora_weights=False)
    return get_peft_model(tiny_llama(), config)


def make_batch(units: list[int], seed: int = 0, length: int = 12) -> Batch:
    """Right-padded mixed lengths; labels -100 on padding and on a 3-token prompt."""
    gen = torch.Generator().manual_seed(seed)
    n = len(units)
    lengths = torch.randint(5, length + 1, (n,), generator=gen)
    lengths[0] = length
    ids = torch.randint(1, VOCAB, (n, length), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    ids[~mask] = 0
    ids[-1, 2] = 0  # the pad id as a real token: its embedding row gets no gradient either way
    labels = ids.masked_fill(~mask, -100)
    labels[:, :3] = -100
    return ids, mask.long(), labels, torch.tensor(units)


def example_losses(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """(B,) losses, each the mean over the example's own target tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    b, t = ids.shape
    tok = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none").view(b, t - 1)
    valid = labels[:, 1:] != -100
    return (tok * valid).sum(1) / valid.sum(1)


LossFn = Callable[..., Tensor]


def reference_unit_grads(
    model: nn.Module, batches: list[tuple[Tensor, ...]], loss: LossFn = example_losses
) -> list[dict[str, Tensor]]:
    """Each unit alone: its examples only (same padding), plain autograd on their summed loss."""
    out = []
    for *inputs, units in batches:
        for u in range(int(units.max()) + 1):
            sel = units == u
            model.zero_grad(set_to_none=True)
            loss(model, *(x[sel] for x in inputs)).sum().backward()
            out.append(
                {
                    n: torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float()
                    for n, p in trainable(model).items()
                }
            )
    model.zero_grad(set_to_none=True)
    return out


def norm_of(grads: dict[str, Tensor]) -> Tensor:
    return torch.sqrt(sum(g.float().square().sum() for g in grads.values()))


def clipped_sum(unit_grads: list[dict[str, Tensor]], c: float) -> dict[str, Tensor]:
    total = {n: torch.zeros_like(g) for n, g in unit_grads[0].items()}
    for grads in unit_grads:
        factor = min(1.0, c / (float(norm_of(grads)) + 1e-6))
        for n, g in grads.items():
            total[n] += factor * g
    return total


def run_engine(
    model: nn.Module, batches: list[tuple[Tensor, ...]], c: float, loss: LossFn = example_losses
) -> tuple[dict, Tensor]:
    clipper = PerUnitClipper(model, c)
    norms = [clipper.backward(loss(model, *b[:-1]), b[-1]) for b in batches]
    write_grads(clipper, model)
    grads = {n: p.grad.float().clone() for n, p in trainable(model).items()}
    clipper.remove()
    return grads, torch.cat(norms)


def assert_grads_close(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float) -> None:
    assert got.keys() == want.keys()
    for n in want:
        scale = float(want[n].abs().max()) + 1e-12
        torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=rtol * scale, msg=n)


def check_against_reference(model: nn.Module, batches: list[tuple[Tensor, ...]], loss: LossFn = example_losses) -> None:
    rtol = 1e-4
    unit_grads = reference_unit_grads(model, batches, loss)
    want_norms = torch.stack([norm_of(g) for g in unit_grads])
    c = float(want_norms.median())  # some units clipped, some not
    grads, norms = run_engine(model, batches, c, loss)
    torch.testing.assert_close(norms, want_norms, rtol=rtol, atol=0)
    assert_grads_close(grads, clipped_sum(unit_grads, c), rtol)


MODELS = {
    "llama-tied": lambda: tiny_llama(tie=True),
    "llama-untied": lambda: tiny_llama(tie=False),
    "gpt2": tiny_gpt2,
    "qwen2-tied": tiny_qwen2,
    "gpt-neox": tiny_neox,
    "lora-qv": lambda: lora(["q_proj", "v_proj"]),
    "lora-all-linear": lambda: lora("all-linear"),
    "lora-last-layer": lambda: get_peft_model(
        tiny_llama(),
        LoraConfig(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[1], init_lora_weights=False),
    ),
}
RECORDS = [0, 1, 2, 3, 4, 5]
USERS = [0, 0, 1, 2, 2, 2]


@pytest.mark.parametrize("units", [RECORDS, USERS], ids=["record", "user"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_single_unit_loop(name: str, units: list[int]) -> None:
    check_against_reference(MODELS[name](), [make_batch(units)])


def test_tied_weights_are_one_parameter() -> None:
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("ghost", [True, False], ids=["ghost", "instantiate"])
@pytest.mark.parametrize("units", [RECORDS, USERS], ids=["record", "user"])
def test_both_linear_norm_methods(monkeypatch: pytest.MonkeyPatch, ghost: bool, units: list[int]):
    monkeypatch.setattr(linear, "use_ghost", lambda *_: ghost)
    check_against_reference(tiny_llama(tie=True), [make_batch(units)])


def test_two_micro_batches_accumulate() -> None:
    batches = [make_batch(USERS, seed=1), make_batch([0, 1, 1, 2], seed=2, length=9)]
    check_against_reference(tiny_gpt2(), batches)
    check_against_reference(tiny_llama(tie=True), batches)


class RecordingSink:
    """A `SumSink` that keeps what it is handed: (name, sum) per parameter, None at a micro-batch's end."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Tensor] | None] = []

    def add(self, name: str, clipped: Tensor) -> None:
        self.events.append((name, clipped.clone()))

    def end_micro_batch(self) -> None:
        self.events.append(None)


def test_a_sink_gets_each_parameters_micro_batch_sum_once() -> None:
    model, batches = tiny_llama(tie=True), [make_batch(USERS, seed=1), make_batch([0, 1, 1, 2], seed=2, length=9)]
    params = trainable(model)
    accumulated = PerUnitClipper(model, 1.0)
    for batch in batches:
        accumulated.backward(example_losses(model, *batch[:3]), batch[3])
    want = accumulated.take_sums()
    accumulated.remove()
    sink = RecordingSink()
    clipper = PerUnitClipper(model, 1.0, sink)
    for batch in batches:
        clipper.backward(example_losses(model, *batch[:3]), batch[3])
        assert not clipper._sums  # nothing is kept between micro-batches
    with pytest.raises(RuntimeError, match="sink"):
        clipper.take_sums()
    clipper.remove()
    ends = [i for i, event in enumerate(sink.events) if event is None]
    assert ends == [len(params), 2 * len(params) + 1]  # every parameter once, then the end, per micro-batch
    got = {n: torch.zeros(p.shape) for n, p in params.items()}
    for start in (0, ends[0] + 1):
        handed = sink.events[start : start + len(params)]
        assert sorted(n for n, _ in handed) == sorted(params)
        assert all(t.dtype == torch.float32 and t.shape == params[n].shape for n, t in handed)
        assert handed[-1][0] == "model.embed_tokens.weight"  # tied: complete with the LM head, last
        for name, t in handed:
            got[name] += t
    assert_grads_close(got, want, rtol=1e-6)


@pytest.mark.parametrize("name", ["llama-tied", "gpt2", "lora-qv"])
def test_bf16_autocast_matches_fp32_reference(name: str) -> None:
    model, batch = MODELS[name](), make_batch(USERS)
    unit_grads = reference_unit_grads(model, [batch])
    want_norms = torch.stack([norm_of(g) for g in unit_grads])
    c = float(want_norms.median())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads, norms = run_engine(model, [batch], c)
    torch.testing.assert_close(norms, want_norms, rtol=2e-2, atol=0)
    want = clipped_sum(unit_grads, c)
    diff = norm_of({n: grads[n] - want[n] for n in want})
    assert diff <= 3e-2 * norm_of(want)


def test_bf16_weights_write_bf16_grads() -> None:
    model, batch = tiny_llama(tie=True).to(torch.bfloat16), make_batch(RECORDS)
    unit_grads = reference_unit_grads(model, [batch])
    want_norms = torch.stack([norm_of(g) for g in unit_grads])
    clipper = PerUnitClipper(model, float(want_norms.median()))
    norms = clipper.backward(example_losses(model, *batch[:3]), batch[3])
    write_grads(clipper, model)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, want_norms, rtol=3e-2, atol=0)
    assert all(p.grad.dtype == torch.bfloat16 for p in trainable(model).values())


def test_no_autograd_weight_grads_before_write() -> None:
    model, batch = tiny_llama(tie=True), make_batch(RECORDS)
    clipper = PerUnitClipper(model, 1.0)
    clipper.backward(example_losses(model, *batch[:3]), batch[3])
    assert all(p.grad is None for p in trainable(model).values())
    write_grads(clipper, model)
    assert all(p.grad is not None and not p.grad.requires_grad for p in trainable(model).values())


def test_empty_step_writes_zeros_and_write_resets() -> None:
    model, batch = tiny_llama(tie=True), make_batch(RECORDS)
    clipper = PerUnitClipper(model, 1.0)
    write_grads(clipper, model)
    assert all(not p.grad.any() for p in trainable(model).values())
    clipper.backward(example_losses(model, *batch[:3]), batch[3])
    write_grads(clipper, model)
    assert any(p.grad.any() for p in trainable(model).values())
    write_grads(clipper, model)  # the accumulators were reset by the previous write
    assert all(not p.grad.any() for p in trainable(model).values())


def test_remove_restores_model() -> None:
    model = lora("all-linear")
    ids, mask, _, _ = make_batch(RECORDS)
    before = model(input_ids=ids, attention_mask=mask).logits
    clipper = PerUnitClipper(model, 1.0)
    during = model(input_ids=ids, attention_mask=mask).logits
    clipper.remove()
    after = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, before)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not model._forward_pre_hooks and not model._forward_hooks
    (example_losses(model, *make_batch(RECORDS)[:3]).sum()).backward()
    assert all(p.grad is not None for p in trainable(model).values())  # plain autograd again


def test_nonfinite_unit_is_dropped() -> None:
    model, batch = tiny_llama(tie=True), make_batch(RECORDS)
    clipper = PerUnitClipper(model, 1.0)
    losses = example_losses(model, *batch[:3])
    norms = clipper.backward(losses * torch.tensor([1, 1, math.nan, 1, 1, 1]), batch[3])
    write_grads(clipper, model)
    got = {n: p.grad.clone() for n, p in trainable(model).items()}
    clipper.remove()
    assert norms[2].isnan() and norms[[0, 1, 3, 4, 5]].isfinite().all()
    keep = torch.tensor([0, 1, 3, 4, 5])
    want, _ = run_engine(model, [(batch[0][keep], batch[1][keep], batch[2][keep], torch.arange(5))], 1.0)
    assert_grads_close(got, want, 1e-4)


class Shared(nn.Module):
    """Modules called twice, and a tied embedding / head: every kind of shared parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.lin, self.norm = nn.Embedding(10, 6), nn.Linear(6, 6), nn.LayerNorm(6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        h = self.lin(torch.tanh(self.lin(self.norm(self.emb(ids)))))
        return self.head(self.norm(h))


def shared_losses(model: nn.Module, ids: Tensor) -> Tensor:
    return model(ids).log_softmax(-1)[..., 3].mean(1)


@pytest.mark.parametrize("units", [RECORDS, USERS], ids=["record", "user"])
def test_modules_called_twice_and_tied(units: list[int]) -> None:
    ids = torch.randint(0, 10, (len(units), 5), generator=torch.Generator().manual_seed(0))
    check_against_reference(Shared(), [(ids, torch.tensor(units))], shared_losses)


class Leaky(nn.Module):
    """Uses a linear layer's weight outside that layer's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x) + x @ self.proj.weight


def test_parameter_used_outside_its_module_is_refused() -> None:
    model = Leaky()
    clipper = PerUnitClipper(model, 1.0)
    with pytest.raises(ConfigError, match=r"proj\.weight"):
        clipper.backward(model(torch.randn(3, 4)).sum(1), torch.arange(3))


def test_a_module_replaced_after_attach_is_refused() -> None:
    """Bug caught: stray gradients looked for on the attach-time parameters only (accelerate's fp8
    conversion swaps nn.Linear for a module with new parameters after the attach)."""
    model = nn.Sequential(nn.Linear(4, 4))
    clipper = PerUnitClipper(model, 1.0)
    model[0] = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match=r"'0\.weight' was not trainable when dpft attached"):
        clipper.backward(model(torch.randn(3, 4)).sum(1), torch.arange(3))


class Broadcast(nn.Module):
    """A LayerNorm applied to a tensor shared by the batch (shape (1, d))."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.register_buffer("table", torch.randn(1, 4))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.norm(self.table)


def test_input_shared_across_examples_is_refused() -> None:
    model = Broadcast()
    clipper = PerUnitClipper(model, 1.0)
    with pytest.raises(ConfigError, match="norm"):
        clipper.backward(model(torch.randn(3, 4)).sum(1), torch.arange(3))


def test_bad_clip_bound_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_grad_norm"):
        PerUnitClipper(tiny_llama(), 0.0)


def test_factory_picks_the_accumulator() -> None:
    model = tiny_llama()
    assert isinstance(make_accumulator(model, None), PlainAccumulator)
    clipper = make_accumulator(model, 1.0)
    assert isinstance(clipper, PerUnitClipper)
    clipper.remove()


def test_bf16_autocast_keeps_norms_sums_and_grads_fp32() -> None:
    model, batch = tiny_llama(tie=True), make_batch(USERS)
    clipper = PerUnitClipper(model, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = example_losses(model, *batch[:3])
    norms = clipper.backward(losses, batch[3])
    assert norms.dtype == torch.float32
    assert clipper._sums and all(s.dtype == torch.float32 for s in clipper._sums.values())
    write_grads(clipper, model)
    clipper.remove()
    assert all(p.grad.dtype == torch.float32 for p in trainable(model).values())


def held_by(clipper: PerUnitClipper) -> tuple[int, int, int]:
    """What the clipper keeps between micro-batches: captures, accumulators, their elements."""
    return len(clipper._captures), len(clipper._sums), sum(s.numel() for s in clipper._sums.values())


def live_tensors() -> int:
    import gc

    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) in (Tensor, nn.Parameter))  # no isinstance: lazy modules


def test_memory_is_flat_in_the_logical_batch() -> None:
    """128 micro-batches in one logical step: the engine holds the same few tensors after each."""
    model = tiny_llama(tie=True)
    clipper = PerUnitClipper(model, 1.0)
    held, tensors = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny ops: OpenMP barriers crawl on a loaded machine
    try:
        run_micro_batches(clipper, model, held, tensors)
    finally:
        torch.set_num_threads(threads)
    n_params = sum(p.numel() for p in trainable(model).values())
    assert set(held) == {(0, len(trainable(model)), n_params)}
    assert tensors[1] <= tensors[0]
    write_grads(clipper, model)
    assert held_by(clipper) == (0, 0, 0)
    clipper.remove()


def run_micro_batches(clipper: PerUnitClipper, model: nn.Module, held: list, tensors: list) -> None:
    for i in range(128):
        batch = make_batch([0, 1, 1, 2], seed=i, length=8)
        clipper.backward(example_losses(model, *batch[:3]), batch[3])
        held.append(held_by(clipper))
        if i in (1, 127):
            tensors.append(live_tensors())


class Norms(nn.Module):
    """torch's RMSNorm, a bias-free LayerNorm, a Gemma-style (1 + w) RMSNorm, and an unknown scale."""

    class GemmaRMSNorm(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(0.1 * torch.randn(d))

        def forward(self, x: Tensor) -> Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)

    class Scale(nn.Module):  # no rule: the generic torch.func one
        def __init__(self, d: int) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.randn(d))

        def forward(self, x: Tensor) -> Tensor:
            return torch.tanh(x * self.gain)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 6)
        self.rms, self.ln, self.gemma = nn.RMSNorm(6), nn.LayerNorm(6, bias=False), self.GemmaRMSNorm(6)
        self.scale, self.head = self.Scale(6), nn.Linear(6, 10)
        for p in (self.rms.weight, self.ln.weight):
            nn.init.normal_(p, 1.0, 0.2)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.scale(self.gemma(self.ln(self.rms(self.emb(ids))))))


@pytest.mark.parametrize("units", [RECORDS, USERS], ids=["record", "user"])
def test_norm_layers_and_generic_fallback(units: list[int]) -> None:
    from dpft.privacy.layers import rule_for

    model = Norms()
    assert [rule_for(m).name for m in (model.rms, model.ln, model.gemma, model.scale)] == [
        "norm",
        "norm",
        "norm",
        "generic",
    ]
    ids = torch.randint(0, 10, (len(units), 5), generator=torch.Generator().manual_seed(0))
    check_against_reference(model, [(ids, torch.tensor(units))], shared_losses)
