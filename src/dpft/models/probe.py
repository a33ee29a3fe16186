"""Check, before a run spends anything, that dpft can clip every trainable parameter of a model.

`check_trainable` runs the clipping engine once on a dummy batch (random token ids: no private
data) and compares it with an explicit per-unit loop of plain backwards. It refuses a model whose
trainable modules have no rule, whose rules fail, whose per-unit gradients come out wrong (a layer
fed the batch's rows in an order the engine cannot map to examples) or non-finite, all with a
`ConfigError` naming the parameter. The model is left as it was: same parameters, no gradients,
same train/eval modes, and the global random state untouched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpft.errors import ConfigError
from dpft.privacy.engine import EPS, PerUnitClipper

# A bound far below any real gradient norm: every unit is clipped, so the sum weighs each unit by
# 1 / its norm, and a wrong norm or a wrong per-unit gradient shows in the sum.
_PROBE_C = 1e-6


def check_trainable(model: nn.Module, vocab_size: int, length: int = 8) -> None:
    """Refuse, before anything is written or charged, a model dpft cannot clip per unit.

    Args:
        model: the model as it will be trained (LoRA-wrapped or full), on its device.
        vocab_size: token ids of the dummy batch are drawn below this (the tokenizer's size).
        length: tokens per dummy example.

    Raises:
        ConfigError: no trainable parameter, a trainable module without a working rule, or
            per-unit gradients that disagree with an explicit per-unit loop.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError(["the model has no trainable parameter"])
    modes = {m: m.training for m in model.modules()}
    device = next(iter(params.values())).device
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Embedding):  # a tokenizer may count more tokens than the model has
        vocab_size = min(vocab_size, embeddings.num_embeddings)
    ids, mask = _dummy_batch(vocab_size, length, device)
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            clipper = _attach(model)  # in the model's own modes: BatchNorm in training is refused
            model.eval()  # no dropout: the engine and the loop must see the same function
            norms, sums = _engine(model, clipper, ids, mask)
            _compare(model, params, ids, mask, norms, sums)
    finally:
        for module, training in modes.items():
            module.train(training)
        for p in params.values():
            p.grad = None


def _dummy_batch(vocab_size: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Two examples of random ids (the second right-padded), from a fixed private generator."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(int(vocab_size), 2), (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, length - length // 4 :] = 0
    return ids.to(device), mask.to(device)


def _losses(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """(B,) per-example mean next-token losses over the unpadded tokens."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    b, t = ids.shape
    tok = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(b, t - 1)
    valid = mask[:, 1:].float()
    return (tok * valid).sum(1) / valid.sum(1)


def _attach(model: nn.Module) -> PerUnitClipper:
    try:
        return PerUnitClipper(model, _PROBE_C)
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError([f"dpft cannot attach its per-unit clipping to this model: {_what(err)}"]) from err


def _engine(model: nn.Module, clipper: PerUnitClipper, ids: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
    try:
        norms = clipper.backward(_losses(model, ids, mask), torch.tensor([0, 1], device=ids.device))
        sums = clipper.take_sums()
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError([f"dpft cannot compute this model's per-unit gradients: {_what(err)}"]) from err
    finally:
        clipper.remove()
    if not bool(torch.isfinite(norms).all()):
        raise ConfigError(["the per-unit gradient norms of a dummy batch are not finite"])
    return norms, sums


def _compare(
    model: nn.Module, params: dict[str, nn.Parameter], ids: Tensor, mask: Tensor, norms: Tensor, sums: dict
) -> None:
    """The engine's clipped sum against the same sum from plain per-unit backwards.

    The loop's sum is formed with the engine's own norms, so a difference in a parameter's sum
    points at that parameter's per-unit gradients; the norms are compared on their own.
    """
    low = any(p.dtype in (torch.float16, torch.bfloat16) for p in params.values())
    tol = 5e-2 if low else 1e-3
    want = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    loop_norms = []
    for u in range(ids.shape[0]):
        for p in params.values():
            p.grad = None
        _losses(model, ids[u : u + 1], mask[u : u + 1]).sum().backward()
        sq = 0.0
        factor = _PROBE_C / (float(norms[u]) + EPS)
        for n, p in params.items():
            if p.grad is not None:
                g = p.grad.float()
                sq += float(g.square().sum())
                want[n].add_(g, alpha=factor)
        loop_norms.append(math.sqrt(sq))
    # A parameter whose gradient is zero in exact arithmetic (a key bias) is compared at the scale
    # of the whole sum: its rounding noise is no disagreement.
    floor = 1e-4 * math.sqrt(sum(float(t.square().sum()) for t in want.values())) + 1e-30
    for n, total in want.items():
        got = sums[n]
        if not bool(torch.isfinite(got).all()):
            raise ConfigError([f"parameter '{n}': its clipped per-unit gradient sum is not finite"])
        scale = float(torch.linalg.vector_norm(total)) + floor
        if float(torch.linalg.vector_norm(got - total)) > tol * scale:
            raise ConfigError(
                [
                    f"parameter '{n}': dpft's per-unit gradients disagree with a per-unit loop on a "
                    "dummy batch (its module's input rows are not one per example, or its rule does "
                    "not fit the module); per-unit clipping cannot bound what one unit changes"
                ]
            )
    for u, (got, ref) in enumerate(zip(norms.tolist(), loop_norms, strict=True)):
        if abs(got - ref) > tol * ref + 1e-12:
            raise ConfigError(
                [
                    f"the per-unit gradient norm of dummy unit {u} is {got:.6g} but a per-unit loop "
                    f"gives {ref:.6g}: some module's per-example gradients are not computed correctly"
                ]
            )


def _what(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
