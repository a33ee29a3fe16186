"""FSDP2 (`--fsdp`): sharding the model, and moving weights and optimizer state between the shards
and the one-process format that checkpoints and the saved model use.

A checkpoint of a sharded run is the checkpoint a single process would write (full tensors), so a
run may be resumed with or without --fsdp, on any number of processes. Gathering is collective:
every rank calls these functions in the same order; rank 0 alone writes what they return.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dpft.privacy.sharded import rows_of


def shard_model(model: nn.Module) -> nn.Module:
    """Every transformer block (the model's `_no_split_modules`) its own FSDP2 group, the root last.

    The root group holds what no block holds: the embeddings, a tied LM head (tied weights must sit
    in one group), the final norm. Parameters are sharded on dim 0, FSDP2's default, which is the
    layout `ReduceScatterSums` reduce-scatters into.
    """
    from torch.distributed.fsdp import fully_shard

    names = next((set(m._no_split_modules) for m in model.modules() if getattr(m, "_no_split_modules", None)), set())
    for block in [m for m in model.modules() if type(m).__name__ in names]:
        fully_shard(block)
    return fully_shard(model)


def full(t: Any) -> Any:
    """A DTensor gathered into the full tensor (collective); anything else as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def own_rows(full_tensor: Tensor, like: DTensor) -> DTensor:
    """This rank's rows of a full tensor, as a DTensor sharded like `like` (no collective)."""
    mesh = like.device_mesh
    start, rows = rows_of(full_tensor.shape[0], mesh.size(), mesh.get_local_rank())
    local = full_tensor[start : start + rows].to(like.to_local().device).clone()
    return DTensor.from_local(local, mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded state tensor gathered (collective)."""
    state = optimizer.state_dict()
    state["state"] = {k: {name: full(v) for name, v in s.items()} for k, s in state["state"].items()}
    return state


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A one-process optimizer state with each parameter-shaped tensor cut to this rank's rows."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {}
    for k, s in state["state"].items():
        p = params[int(k)]
        sharded[k] = {
            name: own_rows(v, p) if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
            for name, v in s.items()
        }
    return {**state, "state": sharded}


def load_full_weight(param: nn.Parameter, value: Tensor) -> None:
    """Copy a full (checkpointed) tensor into a parameter: its rows when sharded."""
    with torch.no_grad():
        if isinstance(param, DTensor):
            param.to_local().copy_(own_rows(value, param).to_local())
        else:
            param.copy_(value)


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's state dict, gathered onto rank 0's CPU (collective; empty on other ranks).

    Tied weights (embeddings and LM head) come back as separate copies; they are made one tensor
    again, so that `save_pretrained` sees them tied and saves the one copy it saves unsharded.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for first, *tied in (n for n in names.values() if len(n) > 1):
        for name in tied:
            if first in state and name in state:
                state[name] = state[first]
    return state
