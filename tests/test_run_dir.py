"""The model card's guarantee in words: what ε is about (add or remove one unit, at the published
q, σ and steps), and that N and what is derived from it are public, not protected."""

from __future__ import annotations

import pytest

from dpft.training.run_dir import model_card

REPORT = {
    "dp": True, "epsilon": 2.62, "delta": 1e-5, "noise_multiplier": 0.8, "max_grad_norm": 1.0,
    "sample_rate": 0.02, "expected_batch_size": 20.0, "steps": 100, "accountant": "pld",
    "neighboring_relation": "add_or_remove_one", "privacy_unit": "record", "num_units": 1000,
    "randomness": "os-entropy",
}  # fmt: skip


@pytest.mark.parametrize(("unit", "one"), [("record", "record"), ("user", "person")])
def test_card_names_the_relation_the_published_parameters_and_that_n_is_public(unit, one):
    card = model_card({**REPORT, "privacy_unit": unit}, "base")
    flat = " ".join(card.split())
    assert "add-or-remove-one" in flat
    assert "sampling rate q = 0.02, noise multiplier σ = 0.8 and 100 steps" in flat
    assert f"adding any single {one} to the training data, or removing one from it" in flat
    assert "N = 1000, is published (privacy.json) and is public, not protected" in flat
    assert "expected batch q·N = 20.0" in flat
    assert f"Replacing one {one} by another is bounded only through group privacy" in flat
    # The old sentence overstated: with N published, "whether any record was in the data" is not hidden.
    assert "was in the training data or not" not in flat


def test_card_lists_the_size_of_the_data_among_what_it_does_not_protect():
    card = model_card(REPORT, "base")
    unprotected = card.split("## What it does not protect", 1)[1]
    assert "The size of the training data (N units) and what is derived from it (q·N): they are public." in unprotected
