"""FSDP2 (`fully_shard`) with the DP engine: the single-process mechanism, sharded.

Every test here runs 2 gloo processes on CPU (one `torch.multiprocessing.spawn` for the module):
- the sharded model's clipped sums (each rank clips its own units against the all-gathered
  weights, then `ReduceScatterSums`) equal the explicit per-unit loop on the unsharded model, for
  full fine-tuning (tied embeddings) and LoRA over a sharded frozen base; the optimizer steps the
  shards to the single-process result;
- several micro-batches per step (a rank's idle pass included): the clipped sums are
  reduce-scattered into each rank's fp32 rows after every micro-batch, no full-shape sum outlives
  its micro-batch (nor more than about one bucket of them its parameters' completion), the step
  equals the single-process step with the same seeded noise, and under bf16 (autocast, or bf16
  weights) the sums stay fp32 and match the fp32 per-unit loop;
- noise once per coordinate: on a zero-gradient step the gathered gradient has std σC (not
  √2·σC), and in seeded mode it is exactly the single-process draw, across uneven shards;
- `dpft train --fsdp` on 2 processes equals the 1-process run with the same unsafe seed (same
  privacy.json and journal, weights within float tolerance; full fine-tuning and LoRA), and a
  sharded run that crashed resumes from its one-process-format checkpoint to the same weights,
  with every step that touched the data in its journal.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
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


def _step(model: torch.nn.Module, mechanism, randomness: Randomness, **reducer_options):
    from dpft.privacy.sharded import ReduceScatterSums
    from dpft.privacy.step import Budget, MemoryJournal, PrivacyStep

    reducer = ReduceScatterSums(model, **reducer_options)
    return PrivacyStep(model, mechanism, Budget(1e-5), randomness, MemoryJournal(), reducer=reducer)


@contextlib.contextmanager
def _counting_fsdp_reductions():
    """Counts FSDP2's own gradient reduce-scatters (its `foreach_reduce`) in the block."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as group

    calls, original = [], group.foreach_reduce
    group.foreach_reduce = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        yield calls
    finally:
        group.foreach_reduce = original


def _plain_backward_reduces(rank: int) -> int:
    """The counter's control: a plain backward on a sharded model does make FSDP reduce-scatter."""
    from dpft.training.fsdp import shard_model

    model = shard_model(tiny_llama())
    ids, mask, labels, _ = make_batch([0, 1])
    with _counting_fsdp_reductions() as calls:
        example_losses(model, ids, mask, labels).sum().backward()
    return len(calls)


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
        with _counting_fsdp_reductions() as fsdp_reductions:
            step.backward(example_losses(model, ids[mine], mask[mine], labels[mine]), local)
        step.finish()
        got = {n: p.grad.full_tensor() for n, p in trainable(model).items()}
        optimizer.step()
        after = {n: p.detach().full_tensor() for n, p in trainable(model).items()}
        if rank == 0:
            expected = {n: before[n] - LR * want[n] for n in want}
            result = {
                "got": got, "want": want, "after": after, "expected": expected, "calls": step._reducer.calls,
                "fsdp_reductions": fsdp_reductions,
            }  # fmt: skip
            torch.save(result, tmp / f"sums-{model_name}-{unit_name}.pt")
        step.remove()


# One logical step in micro-batches: 6 units (users) of 9 examples; rank 0 runs two micro-batches
# and an idle pass, rank 1 three; the single process runs all five.
MICRO_UNITS = [0, 0, 1, 2, 3, 3, 3, 4, 5]
MICRO_BATCHES = {0: [[0], [1, 2]], 1: [[3], [4], [5]]}
MICRO_BUCKET = 4096  # elements: the tiny Llama's sums in 7 buckets, its tied embedding (8192) one alone
MICRO_VARIANTS = ["fp32", "bf16-autocast", "bf16-weights"]


def _micro_batch(batch, units: list[int]):
    """The examples of `units`, with their unit index renumbered 0..U-1 for the micro-batch."""
    *inputs, unit_index = batch
    mine = torch.isin(unit_index, torch.tensor(units))
    return [x[mine] for x in inputs], torch.unique(unit_index[mine], return_inverse=True)[1]


def _idle_losses(model: torch.nn.Module) -> torch.Tensor:
    """As the recipe's idle pass: one pad token, loss × 0 (the sums are unchanged)."""
    ids = torch.zeros((1, 1), dtype=torch.long)
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().sum(dim=(1, 2)) * 0.0


def _keep_pre_noise_rows(reducer) -> dict[str, torch.Tensor]:
    """A copy of the rows `finish` takes from the reducer, before it noises them in place."""
    taken: dict[str, torch.Tensor] = {}
    take = reducer.take

    def recording() -> dict[str, torch.Tensor]:
        rows = take()
        taken.update({n: r.clone() for n, r in rows.items()})
        return rows

    reducer.take = recording
    return taken


def _micro_batch_steps(rank: int, tmp: Path) -> None:
    """Each variant: the per-unit loop and the one-process step on an unsharded copy, then the same
    logical step sharded over 2 ranks, with what the engine and the reducer hold after each pass."""
    from dpft.privacy.sharded import rows_of
    from dpft.privacy.step import Budget, Mechanism, MemoryJournal, PrivacyStep
    from dpft.training.fsdp import shard_model

    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for variant in MICRO_VARIANTS if bf16 else MICRO_VARIANTS[:1]:
        model = tiny_llama(tie=True)
        if variant == "bf16-weights":
            model = model.to(torch.bfloat16)
        batch = make_batch(MICRO_UNITS, seed=3)
        reference = copy.deepcopy(model).float()  # the same weights, fp32: the exact clipped sums
        unit_grads = reference_unit_grads(reference, [batch])
        c = float(torch.stack([norm_of(g) for g in unit_grads]).median())  # some units clipped, some not
        sigma = SIGMA if variant == "fp32" else 0.0  # bf16: σ = 0, B = 1, the gradient is the sum
        mechanism = Mechanism(0.5, 4.0 if sigma else 1.0, sigma, c)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16-autocast")

        single = PrivacyStep(reference, mechanism, Budget(1e-5), Randomness.unsafe_seeded(SEED), MemoryJournal())
        single.begin(0)
        for units in MICRO_BATCHES[0] + MICRO_BATCHES[1]:
            inputs, local = _micro_batch(batch, units)
            single.backward(example_losses(reference, *inputs), local)
        single.finish()
        one_process = {n: p.grad.clone() for n, p in trainable(reference).items()}
        single.remove()

        shard_model(model)
        step = _step(model, mechanism, Randomness.unsafe_seeded(SEED), bucket_elements=MICRO_BUCKET)
        reducer = step._reducer
        taken = _keep_pre_noise_rows(reducer)
        passes = [_micro_batch(batch, units) for units in MICRO_BATCHES[rank]]
        held = []
        step.begin(0)
        for i in range(max(len(b) for b in MICRO_BATCHES.values())):
            with autocast:
                if i < len(passes):
                    inputs, local = passes[i]
                    losses = example_losses(model, *inputs)
                else:
                    losses, local = _idle_losses(model), torch.zeros(1, dtype=torch.long)
            step.backward(losses, local)
            held.append(
                {
                    "engine": len(step._engine._sums), "pending": len(reducer._pending), "held": reducer.held,
                    "rows": {n: (tuple(r.shape), r.dtype) for n, r in reducer._rows.items()},
                }
            )  # fmt: skip
        step.finish()
        sharded = {n: p.grad.full_tensor() for n, p in trainable(model).items()}  # collective
        shapes = {n: tuple(p.shape) for n, p in trainable(model).items()}
        result = {
            "taken": taken, "held": held, "calls": reducer.calls, "buckets": len(reducer._buckets),
            "peak": reducer.peak_held, "shapes": shapes, "grad_dtypes": {n: p.grad.dtype for n, p in trainable(model).items()},
            "local": {n: (rows_of(shape[0], WORLD, rank)[1], *shape[1:]) for n, shape in shapes.items()},
        }  # fmt: skip
        if rank == 0:
            result.update(want=clipped_sum(unit_grads, c), one_process=one_process, sharded=sharded)
        torch.save(result, tmp / f"micro-{variant}-rank{rank}.pt")
        step.remove()
    (tmp / "micro-bf16").write_text(str(bf16))


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
        "sparse": replace(lora_run, batch_size=1),  # q = 1/40: most steps leave a rank (or both) idle
        "checkpointed": replace(lora_run, full=True, lr=1e-3, gradient_checkpointing=True),
        "micro": replace(lora_run, full=True, lr=1e-3, micro_batch_size=1),  # ~4 micro-batches per rank a step
    }


class Crash(RuntimeError):
    pass


def _recipe_runs(tmp: Path, model_dir: str) -> None:
    """Each scenario with --fsdp; then a LoRA run that crashes after step 4 and is resumed."""
    from dpft.training import recipe

    for name in ("lora", "full", "sparse", "checkpointed", "micro"):
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
    # a rank left waiting in a collective fails the test after 2 minutes instead of hanging it
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    _sharded_sums(rank, Path(tmp))
    _micro_batch_steps(rank, Path(tmp))
    (Path(tmp) / f"plain-reductions-{rank}").write_text(str(_plain_backward_reduces(rank)))
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
    # FSDP2 reduced no unclipped gradient of its own (the engine's backward leaves it none); the
    # same count is positive for a plain backward on a sharded model
    assert len(result["fsdp_reductions"]) == 0 and int((fsdp_runs / "plain-reductions-0").read_text()) > 0
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


def _micro(fsdp_runs: Path, variant: str) -> list[dict]:
    if variant != "fp32" and (fsdp_runs / "micro-bf16").read_text() != "True":
        pytest.skip("this CPU has no native bf16")
    return [torch.load(fsdp_runs / f"micro-{variant}-rank{r}.pt") for r in range(WORLD)]


def _gathered(ranks: list[dict]) -> dict[str, torch.Tensor]:
    """The pre-noise sums of the step: the ranks' fp32 rows, stacked."""
    return {n: torch.cat([r["taken"][n] for r in ranks]) for n in ranks[0]["taken"]}


@pytest.mark.slow
def test_micro_batches_sharded_equal_the_per_unit_loop_and_one_process(fsdp_runs):
    ranks = _micro(fsdp_runs, "fp32")
    main = ranks[0]
    for name, want in main["want"].items():  # the step's sums over 5 micro-batches of 2 ranks
        scale = float(want.abs().max()) + 1e-12
        torch.testing.assert_close(_gathered(ranks)[name], want, rtol=1e-4, atol=1e-4 * scale, msg=name)
    for name, want in main["one_process"].items():  # the same seeded noise, once: the one-process step
        scale = float(want.abs().max())
        torch.testing.assert_close(main["sharded"][name], want, rtol=1e-5, atol=1e-5 * scale, msg=name)
    for rank in ranks:  # one reduce-scatter per bucket per pass, idle pass included: ranks in lockstep
        assert rank["buckets"] == 7 and rank["calls"] == 3 * 7


@pytest.mark.slow
def test_no_full_shape_sum_outlives_its_micro_batch(fsdp_runs):
    ranks = _micro(fsdp_runs, "fp32")
    total = sum(math.prod(shape) for shape in ranks[0]["shapes"].values())
    for rank in ranks:
        for held in rank["held"]:  # after every pass: the engine and the reducer hold this rank's rows only
            assert held["engine"] == held["pending"] == held["held"] == 0
            assert held["rows"].keys() == rank["shapes"].keys()
            for name, (shape, dtype) in held["rows"].items():
                assert shape == rank["local"][name] and shape[0] < rank["shapes"][name][0], name
                assert dtype == torch.float32
        # within a pass, the full-shape sums leave bucket by bucket: at most one bucket, or the
        # largest parameter (the tied embedding, 8192), of the model's 26,784 elements at once
        assert rank["peak"] <= max(MICRO_BUCKET, *(math.prod(s) for s in rank["shapes"].values())) < total / 3


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["bf16-autocast", "bf16-weights"])
def test_bf16_sharded_sums_stay_fp32_and_match_the_per_unit_loop(fsdp_runs, variant):
    ranks = _micro(fsdp_runs, variant)
    got, want = _gathered(ranks), ranks[0]["want"]
    assert all(t.dtype == torch.float32 for t in got.values())
    assert all(h["rows"][n][1] == torch.float32 for h in ranks[0]["held"] for n in h["rows"])
    diff = norm_of({n: got[n] - want[n] for n in want})
    assert diff <= 1e-2 * norm_of(want)  # 0.3-0.5% measured: bf16 activations, fp32 sums
    weights = torch.bfloat16 if variant == "bf16-weights" else torch.float32
    assert set(ranks[0]["grad_dtypes"].values()) == {weights}  # rounded once, after the noise


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
@pytest.mark.parametrize("name", ["lora", "full", "sparse", "checkpointed", "micro"])
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


# ---- fast: the layout, the option and its refusals -------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("length", [1, 3, 5, 8, 257])
def test_rows_are_torch_chunks_and_tile_the_dim(length, world):
    from dpft.privacy.sharded import rows_of

    chunks = torch.arange(length).chunk(world)
    spans = [rows_of(length, world, r) for r in range(world)]
    for r, (start, rows) in enumerate(spans):
        want = chunks[r].tolist() if r < len(chunks) else []
        assert list(range(start, start + rows)) == want  # FSDP2 cuts Shard(0) as torch.chunk does
    assert sum(rows for _, rows in spans) == length


def test_fsdp_needs_several_processes(monkeypatch):
    from dpft.errors import ConfigError
    from dpft.training.distributed import Parallel

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="--fsdp"):
        Parallel.from_env("cpu", fsdp=True)


def test_fsdp_is_an_invocation_option_and_not_for_the_baseline():
    from dpft.errors import ConfigError

    assert "fsdp" not in TrainConfig(fsdp=True).public_dict()  # a resume may shard or not
    with pytest.raises(ConfigError, match="--fsdp"):
        TrainConfig(data="d", output="o", fsdp=True, no_dp=True).validate()


def test_reducer_refuses_parameters_that_are_not_sharded(tmp_path):
    from dpft.privacy.sharded import ReduceScatterSums

    with pytest.raises(ValueError, match="sharded on dim 0"):
        ReduceScatterSums(torch.nn.Linear(2, 2))


def test_cli_passes_fsdp_to_every_rank(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from dpft.cli.main import app
    from dpft.training import distributed

    seen = {}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "launch", lambda n, args: seen.update(n=n, args=args) or 0)
    args = ["train", "--data", "d.jsonl", "--output", str(tmp_path / "r"), "--nproc-per-node", "2", "--fsdp"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert seen["n"] == 2 and "--fsdp" in seen["args"]


@pytest.mark.slow
def test_cli_fsdp_runs_two_processes(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    import yaml

    data = write_records(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    args = [
        "train", "--data", str(data), "--output", str(out), "--model", tiny_model_dir, "--batch-size", "8",
        "--micro-batch-size", "4", "--max-steps", "2", "--max-length", "64", "--delta", "1e-3", "--full",
        "--checkpoint-every", "1", "--quiet", "--device", "cpu", "--nproc-per-node", "2", "--fsdp", "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    res = subprocess.run([sys.executable, "-m", "dpft.cli.main", *args], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout[res.stdout.index("{") :])
    assert report["steps"] == 2 and report == json.loads((out / "privacy.json").read_text())
    assert "fsdp" not in yaml.safe_load((out / "config.yaml").read_text())
    assert (out / "model" / "model.safetensors").is_file()
