"""StepLog: the public row holds step, ε and lr only; the private row holds what the data decided."""

import json
from types import SimpleNamespace

import torch

from dpft.run_layout import RunPaths
from dpft.training.step_log import StepLog


def _ranks(is_main=True):
    return SimpleNamespace(is_main=is_main, step_mean=lambda v: torch.cat(v).mean().item() if v else float("nan"))


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _paths(tmp_path):
    paths = RunPaths(tmp_path)
    paths.private.mkdir(parents=True)
    return paths


def test_counts_the_units_above_c_and_keeps_the_loss_private(tmp_path):
    paths, log = _paths(tmp_path), StepLog(clip_bound=2.0)
    log.add(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.5, 2.0]))  # 2.0 is at C, not above: not clipped
    log.add(torch.tensor([5.0]), torch.tensor([4.0]))
    loss = log.write(_ranks(), paths, step=7, epsilon=0.5, lr=1e-3, batch=4, examples=3)
    assert loss == 3.0
    assert _rows(paths.metrics) == [{"step": 7, "epsilon": 0.5, "lr": 1e-3}]
    (private,) = _rows(paths.train_log)
    assert {k: private[k] for k in ("step", "loss", "clipped_fraction", "batch_size", "examples")} == {
        "step": 7,
        "loss": 3.0,
        "clipped_fraction": 0.5,
        "batch_size": 4,
        "examples": 3,
    }


def test_no_dp_has_no_clipped_fraction_and_other_ranks_write_nothing(tmp_path):
    paths = _paths(tmp_path)
    log = StepLog(clip_bound=None)
    log.add(torch.tensor([1.0]), torch.tensor([9.0]))
    log.write(_ranks(), paths, step=1, epsilon=None, lr=0.1, batch=1, examples=1)
    assert _rows(paths.train_log)[0]["clipped_fraction"] is None
    StepLog(1.0).write(_ranks(is_main=False), paths, step=2, epsilon=None, lr=0.1, batch=0, examples=0)
    assert len(_rows(paths.metrics)) == len(_rows(paths.train_log)) == 1
