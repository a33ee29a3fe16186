"""Data-parallel DP-SGD: W processes give the single-process mechanism, noise exactly once.

Fast tests: the unit split, the device resolution, the single-process identity, the CLI launcher.
Slow tests (2 gloo processes on CPU, `torch.multiprocessing.spawn`): a 2-process run equals the
1-process run with the same unsafe seed (same draws, same privacy.json, same weights within float
tolerance; record- and user-level, LoRA, steps where a rank has nothing), parameters bit-identical
across ranks after every step, and the noise std on a zero-gradient step is σC, not √2·σC.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from typer.testing import CliRunner

from dpft.errors import ConfigError
from dpft.models.device import resolve_device
from dpft.privacy.distributed import AllReduceSums, split_units
from dpft.privacy.randomness import Randomness
from dpft.privacy.sampling import PoissonSampler, PrivacyUnits
from dpft.run_layout import RunPaths
from dpft.training.config import TrainConfig
from dpft.training.distributed import Parallel
from helpers import write_records

WORLD = 2
SEED = 7


# ---- the split of the sampled units ---------------------------------------------------------------


def test_split_balances_tokens_and_never_splits_a_unit():
    units = [3, 5, 8, 13, 21, 34]
    weights = [10, 1, 7, 3, 9, 2]
    shares = split_units(units, weights, 2)
    assert sorted(u for s in shares for u in s) == units  # every unit once: none split, none lost
    loads = [sum(weights[units.index(u)] for u in s) for s in shares]
    assert abs(loads[0] - loads[1]) <= max(weights)
    assert shares == split_units(units, weights, 2)  # deterministic: every rank computes the same


def test_split_leaves_empty_shares_when_few_units():
    assert split_units([4], [5], 3) == [[4], [], []]
    assert split_units([], [], 2) == [[], []]
    assert split_units([2, 1], [1, 1], 1) == [[1, 2]]
    with pytest.raises(ValueError):
        split_units([1], [1, 2], 2)


# ---- devices ---------------------------------------------------------------------------------------


def test_resolve_device_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("bad", ["gpu", "cpu:0", "cuda:x", "auto:1", ""])
def test_resolve_device_refuses_unknown_names(bad):
    with pytest.raises(ConfigError, match="--device"):
        resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_resolve_device_cuda_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resolve_device_cuda_index_and_local_rank():
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(ConfigError):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(ConfigError):
        resolve_device("cuda:0", local_rank=0)


def test_device_and_nproc_are_not_run_settings():
    public = TrainConfig(device="cpu", nproc_per_node=2).public_dict()
    assert "device" not in public and "nproc_per_node" not in public  # a resume may move device


# ---- one process: every hook is the identity ------------------------------------------------------


def test_single_process_parallel_is_the_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    par = Parallel.from_env("cpu")
    assert (par.rank, par.world_size, par.is_main, par.distributed) == (0, 1, True, False)
    sampler = PoissonSampler(10, 0.5, Randomness.unsafe_seeded(1))
    assert par.sampler(sampler) is sampler and par.reducer(torch.nn.Linear(1, 1)) is None
    units = np.array([1, 4, 7])
    assert par.local_units(units, [], []) is units
    losses = [torch.tensor([1.0, 2.0]), torch.tensor([4.0])]
    assert par.step_mean(losses) == torch.cat(losses).mean().item()


def test_all_reduce_sums_in_a_group_of_one(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        reducer = AllReduceSums(bucket_elements=6)
        assert reducer.adds_noise
        tensors = [torch.arange(4.0), torch.ones(2, 1), torch.full((3,), 2.0)]
        before = [t.clone() for t in tensors]
        reducer.reduce(tensors)
        assert all(torch.equal(a, b) for a, b in zip(tensors, before, strict=True))
        assert reducer.calls == 2  # 4 + 2 elements in one bucket, 3 in the next
        with pytest.raises(ValueError):
            reducer.reduce([torch.zeros(2, dtype=torch.float64)])
    finally:
        dist.destroy_process_group()


# ---- the CLI launcher ------------------------------------------------------------------------------


def test_cli_nproc_launches_torchrun_with_the_typed_arguments(monkeypatch, tmp_path):
    from dpft.cli.main import app
    from dpft.training import distributed

    seen = {}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(distributed, "launch", lambda n, args: seen.update(n=n, args=args) or 0)
    args = ["train", "--data", "d.jsonl", "--output", str(tmp_path / "r"), "--nproc-per-node", "2"]
    res = CliRunner().invoke(app, [*args, "--quiet", "--unsafe-seed", "3", "--json"])
    assert res.exit_code == 0, res.output
    assert seen["n"] == 2
    got = seen["args"]
    assert got[:1] == ["--json"] and "--quiet" in got
    assert got[got.index("--unsafe-seed") + 1] == "3" and got[got.index("--nproc-per-node") + 1] == "2"
    assert got[got.index("--data") + 1] == "d.jsonl" and "--epsilon" not in got  # defaults are not retyped


# ---- two processes (gloo) --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scenarios(tmp: Path, model_dir: str) -> dict[str, TrainConfig]:
    data = str(write_records(tmp / "d.jsonl"))
    base = TrainConfig(
        data=data, output="", model=model_dir, batch_size=8, micro_batch_size=4, max_steps=5, lr=1e-2,
        max_length=64, quiet=True, epsilon=8.0, delta=1e-3, checkpoint_every=0, unsafe_seed=SEED,
        device="cpu", dtype="fp32",
    )  # fmt: skip
    return {
        "record": base,
        "user": replace(base, privacy_unit="user", max_records_per_user=4, batch_size=4),
        "sparse": replace(base, batch_size=1),  # q = 1/40: most steps leave a rank (or both) empty
    }


def _worker(rank: int, port: int, tmp: str, model_dir: str) -> None:
    """One rank: join the group, run every scenario, check the parameters after each step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from dpft.privacy import distributed as pdist
    from dpft.training import recipe

    out: dict = {"param_mismatch": [], "draws": {}, "shares": {}, "reduce_calls": {}}
    original_step, original_sample = recipe._train_step, pdist.BroadcastSampler.sample
    scenario = {"name": ""}

    def sample(self, step):
        units = original_sample(self, step)
        out["draws"].setdefault(scenario["name"], []).append(units.tolist())
        return units

    def checked_step(run, t):
        original_step(run, t)
        flat = torch.cat([p.detach().reshape(-1).double() for p in run.model.parameters() if p.requires_grad])
        gathered = [torch.zeros_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        out["param_mismatch"].append(float((gathered[0] - gathered[1]).abs().max()))
        out["reduce_calls"][scenario["name"]] = run.step._reducer.calls

    recipe._train_step, pdist.BroadcastSampler.sample = checked_step, sample
    for name, config in _scenarios(Path(tmp), model_dir).items():
        scenario["name"] = name
        recipe.train(replace(config, output=str(Path(tmp) / f"{name}-2p")))
    out["noise"] = _zero_gradient_noise()
    dist.destroy_process_group()
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(out))


SIGMA, CLIP = 1.5, 2.0


def _zero_gradient_noise() -> dict:
    """A step with no unit on any rank: the released gradient × B is the noise alone."""
    from dpft.privacy.step import Budget, Mechanism, MemoryJournal, PrivacyStep

    model = torch.nn.Linear(256, 256)
    result = {}
    for label, randomness in (("secure", Randomness.secure()), ("seeded", Randomness.unsafe_seeded(SEED))):
        step = PrivacyStep(
            model, Mechanism(0.1, 1.0, SIGMA, CLIP), Budget(1e-5), randomness, MemoryJournal(), reducer=AllReduceSums()
        )
        step.begin(3)
        step.finish()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        gathered = [torch.zeros_like(grad) for _ in range(WORLD)]
        dist.all_gather(gathered, grad)
        result[label] = {
            "std": grad.std().item(),
            "identical": bool(torch.equal(gathered[0], gathered[1])),
            "calls": step._reducer.calls,
            "grad": grad[:1000].tolist(),
        }
        step.remove()
        for p in model.parameters():
            p.grad = None
    return result


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, tiny_model_dir):
    """Every 2-process scenario in one spawn (each process start costs seconds on a 2-core box)."""
    tmp = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(tmp), tiny_model_dir), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return tmp, ranks


def _single(tmp: Path, model_dir: str, name: str) -> Path:
    from dpft.training import recipe

    out = tmp / f"{name}-1p"
    if not out.exists():
        recipe.train(replace(_scenarios(tmp, model_dir)[name], output=str(out)))
    return out


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["record", "user", "sparse"])
def test_two_processes_equal_one(two_process_runs, tiny_model_dir, name, one_torch_thread):
    tmp, ranks = two_process_runs
    one, two = _single(tmp, tiny_model_dir, name), tmp / f"{name}-2p"
    assert json.loads((two / "privacy.json").read_text()) == json.loads((one / "privacy.json").read_text())
    one_p, two_p = RunPaths(one), RunPaths(two)
    assert two_p.journal.read_bytes() == one_p.journal.read_bytes()  # written by rank 0 alone, once per step
    config = _scenarios(tmp, tiny_model_dir)[name]
    n_units = json.loads(one_p.data_stats.read_text())["units"]
    sampler = PoissonSampler(n_units, config.batch_size / n_units, Randomness.unsafe_seeded(SEED))
    expected = [sampler.sample(t).tolist() for t in range(config.max_steps)]
    assert ranks[0]["draws"][name] == ranks[1]["draws"][name] == expected  # one draw, the same everywhere
    rows = [[json.loads(r) for r in p.train_log.read_text().splitlines()] for p in (one_p, two_p)]
    assert [(r["batch_size"], r["examples"]) for r in rows[0]] == [(r["batch_size"], r["examples"]) for r in rows[1]]
    for a, b in zip(rows[0], rows[1], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, nan_ok=True)
        assert a["clipped_fraction"] == pytest.approx(b["clipped_fraction"], nan_ok=True)  # counted over both ranks
    w1, w2 = _adapter(one), _adapter(two)
    assert set(w1) == set(w2)
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=2e-5, rtol=1e-4)
    assert ranks[0]["reduce_calls"][name] == config.max_steps  # one all-reduce per logical step (LoRA)


@pytest.mark.slow
def test_sparse_scenario_has_steps_with_an_empty_share(two_process_runs, tiny_model_dir):
    _, ranks = two_process_runs
    assert any(len(units) < WORLD for units in ranks[0]["draws"]["sparse"])


@pytest.mark.slow
def test_parameters_identical_on_every_rank_after_every_step(two_process_runs):
    _, ranks = two_process_runs
    assert len(ranks[0]["param_mismatch"]) == 15 and max(ranks[0]["param_mismatch"]) == 0.0


@pytest.mark.slow
def test_noise_is_added_once_not_on_every_rank(two_process_runs):
    _, ranks = two_process_runs
    for label in ("secure", "seeded"):
        got = ranks[0]["noise"][label]
        assert got["identical"] and ranks[1]["noise"][label]["identical"] and got["calls"] == 1
        # 65,792 coordinates: the std estimate is within ±1% of σC; √2·σC would be 41% above
        assert got["std"] == pytest.approx(SIGMA * CLIP, rel=0.02)
    # seeded: exactly the single-process draw (rank 0's noise + rank 1's zeros)
    from dpft.privacy.noise import add_gaussian_noise

    alone = [torch.zeros(256, 256), torch.zeros(256)]
    add_gaussian_noise(alone, SIGMA * CLIP, Randomness.unsafe_seeded(SEED), 3)
    expected = torch.cat([t.reshape(-1) for t in alone])[:1000]
    assert torch.equal(torch.tensor(ranks[0]["noise"]["seeded"]["grad"]), expected)


def _cap_worker(rank: int, port: int, tmp: str) -> None:
    """Each rank draws its users' capped records from fresh OS entropy, then adopts rank 0's."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    users = 20
    examples = [list(range(6 * u, 6 * u + 6)) for u in range(users)]
    lengths = [3 + i % 5 for i in range(6 * users)]
    drawn = PrivacyUnits(examples, [f"u{u}" for u in range(users)], 2, Randomness.secure(), lengths)
    units = Parallel(rank, WORLD).agreed_units(drawn)
    sampled = np.arange(users)
    weights = [sum(lengths[i] for i in units.unit_examples[u]) for u in sampled]
    out = {
        "examples": units.unit_examples,
        "example_unit": units.example_unit.tolist(),
        "share": split_units(list(sampled), weights, WORLD)[rank],
    }
    dist.destroy_process_group()
    (Path(tmp) / f"cap{rank}.json").write_text(json.dumps(out))


@pytest.mark.slow
def test_every_rank_keeps_rank_0s_choice_of_each_users_records(tmp_path):
    """Secure randomness draws each rank's cap independently (15^20 choices): without rank 0's choice on
    every rank the token weights, and so the split of a batch, would differ, and a unit could be clipped
    on two ranks (2C) or on none."""
    torch.multiprocessing.spawn(_cap_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"cap{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["examples"] == ranks[1]["examples"] and ranks[0]["example_unit"] == ranks[1]["example_unit"]
    assert all(len(e) == 2 for e in ranks[0]["examples"])
    assert sorted(ranks[0]["share"] + ranks[1]["share"]) == list(range(20))  # every unit on exactly one rank


@pytest.mark.slow
def test_cli_nproc_per_node_runs_two_processes(tmp_path, tiny_model_dir):
    data = write_records(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    args = [
        "train", "--data", str(data), "--output", str(out), "--model", tiny_model_dir, "--batch-size", "8",
        "--micro-batch-size", "4", "--max-steps", "2", "--max-length", "64", "--delta", "1e-3",
        "--checkpoint-every", "0", "--quiet", "--device", "cpu", "--nproc-per-node", "2", "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    res = subprocess.run([sys.executable, "-m", "dpft.cli.main", *args], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout[res.stdout.index("{") :])
    assert report["steps"] == 2 and report == json.loads((out / "privacy.json").read_text())
