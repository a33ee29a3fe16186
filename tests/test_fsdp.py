"""FSDP2 (`fully_shard`) with the DP engine: the single-process mechanism, sharded.

Every test here runs 2 gloo processes on CPU (one `torch.multiprocessing.spawn` for the module):
- the sharded model's clipped sums (each rank clips its own units against the all-gathered
  weights, then `ReduceScatterSums`) equal the explicit per-unit loop on the unsharded model, for
  full fine-tuning (tied embeddings) and LoRA over a sharded frozen base; the optimizer steps the
  shards to the single-process result;
- noise once per coordinate: on a zero-gradient step the gathered gradient has std σC (not
  √2·σC), and in seeded mode it is exactly the single-process draw, across uneven shards;
- `dpft train --fsdp` on 2 processes equals the 1-process run with the same unsafe seed (same
  privacy.json and journal, weights within float tolerance; full fine-tuning and LoRA), and a
  sharded run that crashed resumes from its one-process-format checkpoint to the same weights,
  with every step that touched the data in its journal.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dpft.privacy.randomness import Randomness
from dpft.run_layout import RunPaths
from dpft.training.config import TrainConfig
from helpers import tiny_llama, trainable, write_records
from test_engine import clipped_sum, example_losses, lora, make_batch, norm_of, reference_unit_grads

WORLD = 2
SEED = 7
SIGMA, CLIP = 1.5, 2.0
LR = 0.1
UNITS = {"record": [0, 1, 2, 3, 4, 5], "user": [0, 0, 1, 2, 2, 2]}
MODELS = {"full": lambda: tiny_llama(tie=True), "lora": lambda: lora("all-linear")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(model: torch.nn.Module, mechanism, randomness: Randomness):
    from dpft.privacy.sharded import ReduceScatterSums
    from dpft.privacy.step import Budget, MemoryJournal, PrivacyStep

    reducer = ReduceScatterSums(trainable(model))
    return PrivacyStep(model, mechanism, Budget(1e-5), randomness, MemoryJournal(), reducer=reducer)


def _sharded_sums(rank: int, tmp: Path) -> None:
    """Each model and unit layout: reference on the unsharded model, then the sharded DP step."""
    from dpft.privacy.step import Mechanism
    from dpft.training.fsdp import shard_model

    for (model_name, build), (unit_name, units) in [(m, u) for m in MODELS.items() for u in UNITS.items()]:
        model = build()
        ids, mask, labels, unit_index = make_batch(units)
        unit_grads = reference_unit_grads(model, [(ids, mask, labels, unit_index)])
        c = float(torch.stack([norm_of(g) for g in unit_grads]).median())  # some units clipped, some not
        want = clipped_sum(unit_grads, c)
        before = {n: p.detach().clone() for n, p in trainable(model).items()}
        shard_model(model)
        step = _step(model, Mechanism(0.5, 1.0, 0.0, c), Randomness.unsafe_seeded(1))  # σ = 0, B = 1: the sum
        optimizer = torch.optim.SGD(list(trainable(model).values()), lr=LR)
        step.attach(optimizer)
        half = (int(unit_index.max()) + 2) // 2
        mine = unit_index < half if rank == 0 else unit_index >= half  # record: 3 units each; user: {0, 1} | {2}
        local = torch.unique(unit_index[mine], return_inverse=True)[1]
        step.begin(0)
        step.backward(example_losses(model, ids[mine], mask[mine], labels[mine]), local)
        step.finish()
        got = {n: p.grad.full_tensor() for n, p in trainable(model).items()}
        optimizer.step()
        after = {n: p.detach().full_tensor() for n, p in trainable(model).items()}
        if rank == 0:
            expected = {n: before[n] - LR * want[n] for n in want}
            result = {"got": got, "want": want, "after": after, "expected": expected, "calls": step._reducer.calls}
            torch.save(result, tmp / f"sums-{model_name}-{unit_name}.pt")
        step.remove()


def _zero_gradient_noise(rank: int, tmp: Path) -> None:
    """A step with no unit on any rank, uneven shards (257 rows over 2 ranks): the noise alone."""
    from dpft.privacy.step import Mechanism
    from dpft.training.fsdp import shard_model

    result = {}
    for label, randomness in (("secure", Randomness.secure()), ("seeded", Randomness.unsafe_seeded(SEED))):
        torch.manual_seed(0)
        model = shard_model(torch.nn.Sequential(torch.nn.Linear(255, 257), torch.nn.Linear(257, 3)))
        step = _step(model, Mechanism(0.1, 1.0, SIGMA, CLIP), randomness)
        step.begin(3)
        step.finish()
        result[label] = [p.grad.full_tensor() for p in model.parameters()]
        result[label + "-local-rows"] = [p.grad.to_local().shape[0] for p in model.parameters()]
        step.remove()
    torch.save(result, tmp / f"noise-rank{rank}.pt")


def _scenarios(tmp: Path, model_dir: str) -> dict[str, TrainConfig]:
    data = str(tmp / "d.jsonl")  # written once, before the ranks start: two writers would race
    lora_run = TrainConfig(
        data=data, output="", model=model_dir, batch_size=8, micro_batch_size=4, max_steps=5, lr=1e-2,
        max_length=64, quiet=True, epsilon=8.0, delta=1e-3, checkpoint_every=0, unsafe_seed=SEED,
        device="cpu", dtype="fp32", lora_targets="all-linear",
    )  # fmt: skip
    return {
        "lora": lora_run,
        "full": replace(lora_run, full=True, lr=1e-3),
        "uncapped": replace(lora_run, epsilon=None, noise_multiplier=1.0),  # a resume may run past 5 steps
    }


class Crash(RuntimeError):
    pass


def _recipe_runs(tmp: Path, model_dir: str) -> None:
    """Each scenario with --fsdp; then a LoRA run that crashes after step 4 and is resumed."""
    from dpft.training import recipe

    for name in ("lora", "full"):
        config = _scenarios(tmp, model_dir)[name]
        recipe.train(replace(config, output=str(tmp / f"{name}-fsdp"), fsdp=True))
    original = recipe._train_step

    def crashing(run, t):
        original(run, t)
        if t == 3:  # steps 3 and 4 journalled and applied; the last checkpoint is step 2's
            raise Crash

    recipe._train_step = crashing
    config = replace(_scenarios(tmp, model_dir)["uncapped"], checkpoint_every=2, output=str(tmp / "resumed-fsdp"))
    with contextlib.suppress(Crash):
        recipe.train(replace(config, fsdp=True))
    recipe._train_step = original
    recipe.train(TrainConfig(resume=config.output, quiet=True, device="cpu", fsdp=True))


def _worker(rank: int, port: int, tmp: str, model_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    _sharded_sums(rank, Path(tmp))
    _zero_gradient_noise(rank, Path(tmp))
    _recipe_runs(Path(tmp), model_dir)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny_model_dir) -> Path:
    """Every 2-process check in one spawn (each process start costs seconds on a 2-core box)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    write_records(tmp / "d.jsonl")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(tmp), tiny_model_dir), nprocs=WORLD, join=True)
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("units", list(UNITS))
@pytest.mark.parametrize("model", list(MODELS))
def test_sharded_clipped_sums_equal_the_per_unit_loop(fsdp_runs, model, units):
    result = torch.load(fsdp_runs / f"sums-{model}-{units}.pt")
    assert result["got"].keys() == result["want"].keys() and result["calls"] == 1  # one reduce-scatter
    for name, want in result["want"].items():
        scale = float(want.abs().max()) + 1e-12
        torch.testing.assert_close(result["got"][name], want, rtol=1e-4, atol=1e-4 * scale, msg=name)
    for name, expected in result["expected"].items():  # the optimizer stepped the shards
        torch.testing.assert_close(result["after"][name], expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_noise_is_added_once_per_coordinate(fsdp_runs):
    ranks = [torch.load(fsdp_runs / f"noise-rank{r}.pt") for r in range(WORLD)]
    assert ranks[0]["secure-local-rows"] == [129, 129, 2, 2] and ranks[1]["secure-local-rows"] == [128, 128, 1, 1]
    for label in ("secure", "seeded"):
        for a, b in zip(ranks[0][label], ranks[1][label], strict=True):
            assert torch.equal(a, b)  # every rank holds the same gathered gradient
        flat = torch.cat([g.reshape(-1) for g in ranks[0][label]])
        # 66,566 coordinates: the std estimate is within ±1% of σC; √2·σC would be 41% above
        assert flat.std().item() == pytest.approx(SIGMA * CLIP, rel=0.02)
    from dpft.privacy.noise import add_gaussian_noise

    alone = [torch.zeros(g.shape) for g in ranks[0]["seeded"]]
    add_gaussian_noise(alone, SIGMA * CLIP, Randomness.unsafe_seeded(SEED), 3)
    for got, want in zip(ranks[0]["seeded"], alone, strict=True):
        assert torch.equal(got, want)  # the one-process draw, coordinate for coordinate


def _single(tmp: Path, model_dir: str, name: str) -> Path:
    from dpft.training import recipe

    out = tmp / f"{name}-1p"
    if not out.exists():
        recipe.train(replace(_scenarios(tmp, model_dir)[name], output=str(out)))
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted((run / "model").glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def _assert_same_weights(one: Path, two: Path, atol: float) -> None:
    w1, w2 = _weights(one), _weights(two)
    assert set(w1) == set(w2)
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=atol, rtol=1e-4, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "full"])
def test_two_sharded_processes_equal_one(fsdp_runs, tiny_model_dir, name, one_torch_thread):
    one, two = _single(fsdp_runs, tiny_model_dir, name), fsdp_runs / f"{name}-fsdp"
    assert json.loads((two / "privacy.json").read_text()) == json.loads((one / "privacy.json").read_text())
    assert RunPaths(two).journal.read_bytes() == RunPaths(one).journal.read_bytes()
    _assert_same_weights(one, two, atol=2e-5)


@pytest.mark.slow
def test_a_sharded_run_resumes_to_the_same_weights_and_accounts_the_lost_steps(fsdp_runs, tiny_model_dir):
    resumed = fsdp_runs / "resumed-fsdp"
    report = json.loads((resumed / "privacy.json").read_text())
    assert report["steps"] == 5 + 2  # steps 3 and 4 of the crashed attempt touched the data: counted
    assert report["segments"] == [[report["sample_rate"], report["noise_multiplier"], 7]]
    _assert_same_weights(_single(fsdp_runs, tiny_model_dir, "uncapped"), resumed, atol=2e-5)
