"""DPTrainer under torchrun: 2 gloo processes give the 1-process run (same unsafe seed).

Each rank builds its own TrainingArguments (which join the process group, as under torchrun) and
DPTrainer. The model must not be wrapped in DistributedDataParallel (its hooks would all-reduce
each backward's unclipped gradients and wait for as many backwards on every rank); dpft's one
all-reduce of the clipped sums, with the noise added once on rank 0, replaces it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import TrainerCallback

from helpers import write_records
from test_distributed import WORLD, _free_port

SCENARIOS = {
    "record": {"expected_batch_size": 8},
    "user": {"expected_batch_size": 4, "privacy_unit": "user", "max_records_per_user": 4},
}


def _trainer(tmp: Path, model_dir: str, out: str, scenario: str):
    from test_hf_trainer import dp_trainer, privacy, records, training_args

    data = records(write_records(tmp / "d.jsonl"))
    args = training_args(tmp / out, max_steps=4, per_device_train_batch_size=4)
    return dp_trainer(tmp, model_dir, data=data, args=args, priv=privacy(**SCENARIOS[scenario]))


class RefuseDDP(TrainerCallback):
    """Fail fast if the Trainer wrapped the model in DDP (its first step would hang, not fail)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if isinstance(self.trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel):
            raise AssertionError("the model was wrapped in DistributedDataParallel")


def _worker(rank: int, port: int, tmp: str, model_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from dpft.privacy.distributed import BroadcastSampler

    out: dict = {"draws": {}, "shares": {}}
    sample = BroadcastSampler.sample
    name = {"now": ""}

    def spy(self, step):
        units = sample(self, step)
        out["draws"].setdefault(name["now"], []).append(units.tolist())
        return units

    BroadcastSampler.sample = spy
    for scenario in SCENARIOS:
        name["now"] = scenario
        trainer = _trainer(Path(tmp), model_dir, f"{scenario}-2p", scenario)
        trainer.add_callback(RefuseDDP(trainer))
        out["world"], out["rank"] = trainer.args.world_size, dist.get_rank()
        trainer.train()
        flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters() if p.requires_grad])
        gathered = [torch.zeros_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        out[f"{scenario}-mismatch"] = float((gathered[0] - gathered[1]).abs().max())
        out[f"{scenario}-calls"] = trainer._dp.step._reducer.calls
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("hf-ddp")
    env = {"DPFT_LEDGER": str(tmp / "ledger.sqlite")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        torch.multiprocessing.spawn(_worker, args=(_free_port(), str(tmp), tiny_model_dir), nprocs=WORLD, join=True)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return tmp, [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_processes_equal_one(two_processes, tiny_model_dir, scenario, sampled, one_torch_thread):
    tmp, ranks = two_processes
    assert [r["world"] for r in ranks] == [WORLD, WORLD] and [r["rank"] for r in ranks] == [0, 1]
    one = _trainer(tmp, tiny_model_dir, f"{scenario}-1p", scenario)
    one.train()
    assert ranks[0]["draws"][scenario] == ranks[1]["draws"][scenario] == [u for _, u in sampled]
    a, b = tmp / f"{scenario}-1p", tmp / f"{scenario}-2p"
    assert json.loads((b / "privacy.json").read_text()) == json.loads((a / "privacy.json").read_text())
    for name in ("private/journal.jsonl", "metrics.jsonl"):
        assert (b / name).read_bytes() == (a / name).read_bytes()  # rank 0 alone wrote, once per step
    logs = [[json.loads(r) for r in (p / "private" / "train-log.jsonl").read_text().splitlines()] for p in (a, b)]
    assert [(r["batch_size"], r["examples"]) for r in logs[0]] == [(r["batch_size"], r["examples"]) for r in logs[1]]
    for x, y in zip(logs[0], logs[1], strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)  # the whole step's mean, gathered from both ranks
    w1, w2 = (load_file(p / "model" / "adapter_model.safetensors") for p in (a, b))
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=2e-5, rtol=1e-4)
    assert ranks[0][f"{scenario}-mismatch"] == 0.0 and ranks[0][f"{scenario}-calls"] == 4  # one reduce per step
