"""The randomness of sampling, capping and noise is secret: OS entropy by default, never written.

Invariants 4 and 7: two runs with the same settings draw different batches and noise; a seeded run
(only with the explicitly unsafe flag) is reproducible, says so, and its seed is in no shipped
file; each user's capped records are chosen independently of every other user.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

import dpft
from dpft.privacy.randomness import Randomness
from dpft.privacy.sampling import PoissonSampler, PrivacyUnits
from helpers import public_files, write_records
from test_train_e2e import base_options

SEED = 48_151_623  # a value that cannot appear in a run's files by chance


def batch_sizes(run: Path) -> list[int]:
    return [json.loads(r)["batch_size"] for r in (run / "private" / "train-log.jsonl").read_text().splitlines()]


def adapter(run: Path) -> dict:
    return load_file(run / "model" / "adapter_model.safetensors")


def train(tmp_path: Path, tiny_model_dir: str, name: str, **extra) -> Path:
    data = tmp_path / "d.jsonl"
    if not data.is_file():
        write_records(data, n=40)
    opts = base_options(tiny_model_dir, max_steps=8, batch_size=20, **extra)
    dpft.train(str(data), str(tmp_path / name), **opts)
    return tmp_path / name


def test_two_secure_runs_draw_different_batches_and_noise(tmp_path, tiny_model_dir):
    first, second = (train(tmp_path, tiny_model_dir, n) for n in ("a", "b"))
    assert batch_sizes(first) != batch_sizes(second)  # Binomial(40, 0.5) eight times: equal w.p. < 1e-5
    a, b = adapter(first), adapter(second)
    assert any(not np.allclose(a[k].numpy(), b[k].numpy()) for k in a)
    assert json.loads((first / "privacy.json").read_text())["randomness"] == "os-entropy"


def test_unsafe_seed_reproduces_says_so_and_is_written_nowhere_public(tmp_path, tiny_model_dir):
    first, second = (train(tmp_path, tiny_model_dir, n, unsafe_seed=SEED) for n in ("a", "b"))
    assert batch_sizes(first) == batch_sizes(second)
    a, b = adapter(first), adapter(second)
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    privacy = json.loads((first / "privacy.json").read_text())
    assert privacy["randomness"] == "seeded"
    assert "Reproducible (unsafe) randomness" in (first / "model" / "README.md").read_text()
    for f in public_files(first):
        assert str(SEED).encode() not in f.read_bytes(), f


def test_secure_sampler_is_not_reproducible_and_seeded_one_is_keyed_by_step():
    secure = PoissonSampler(1000, 0.05, Randomness.secure())
    assert not all(np.array_equal(secure.sample(3), secure.sample(3)) for _ in range(3))
    seeded = PoissonSampler(1000, 0.05, Randomness.unsafe_seeded(7))
    assert np.array_equal(seeded.sample(3), seeded.sample(3))
    assert not np.array_equal(seeded.sample(3), seeded.sample(4))


def test_a_users_capped_records_do_not_depend_on_other_users():
    """Bug caught: one stream for all users (removing one user changes which records others keep)."""
    examples = [list(range(10 * u, 10 * u + 10)) for u in range(6)]
    ids = [f"user-{u}" for u in range(6)]
    randomness = Randomness.unsafe_seeded(3)
    full = PrivacyUnits(examples, ids, 2, randomness).unit_examples
    assert len({tuple(np.array(k) % 10) for k in full}) > 1  # users do not all keep the same positions
    without_first = PrivacyUnits(examples[1:], ids[1:], 2, randomness).unit_examples
    assert without_first == full[1:]


def test_secure_cap_is_fresh_per_run_and_bounded():
    examples, ids = [list(range(50))], ["u"]
    draws = {tuple(PrivacyUnits(examples, ids, 3, Randomness.secure()).unit_examples[0]) for _ in range(5)}
    assert len(draws) > 1 and all(len(d) == 3 for d in draws)
