"""The model folder is portable: hub metadata in the card, the embedded base recorded by its hub id."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from dpft.models import loading
from dpft.models.embedded import EMBEDDED_NAME
from dpft.models.loading import EMBEDDED_HUB_ID, load_run_model, with_lora
from dpft.run_layout import RunPaths
from dpft.training.run_dir import save_model, write_model_card
from helpers import tiny_llama, tiny_tokenizer

REPORT = {"privacy_unit": "record", "dp": False}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---", 2)[1])


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny model standing in for the embedded SmolLM2 (no GGUF conversion in a unit test)."""
    base = tmp_path / "embedded"
    tiny_llama().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    monkeypatch.setattr(loading, "embedded_model_dir", lambda: base)
    return base


def trained_adapter(base: Path):
    model = with_lora(loading.load_base_model(EMBEDDED_NAME).model, 4, 8, "auto")
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.5)  # stands in for training
    return model


def test_adapter_folder_records_the_hub_id_and_loads_elsewhere(tmp_path: Path, embedded: Path) -> None:
    paths = RunPaths(tmp_path / "run")
    model = trained_adapter(embedded)
    save_model(paths, model, tiny_tokenizer(), "lora", EMBEDDED_NAME)
    write_model_card(paths, REPORT, EMBEDDED_NAME)

    adapter = json.loads((paths.model / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == EMBEDDED_HUB_ID
    assert json.loads(paths.model_meta.read_text())["base_model"] == EMBEDDED_HUB_ID
    assert str(embedded) not in "".join(p.read_text() for p in paths.model.glob("*.json"))
    meta = front_matter(paths.card.read_text())
    assert meta == {
        "base_model": EMBEDDED_HUB_ID,
        "license": "apache-2.0",
        "library_name": "peft",
        "tags": ["differential-privacy", "dpft"],
    }
    assert "No privacy guarantee" in paths.card.read_text()

    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(paths.root, moved)
    shutil.rmtree(paths.root)
    loaded = load_run_model(moved)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        want = model.merge_and_unload()(ids).logits
        torch.testing.assert_close(loaded.model(ids).logits, want)
    # what the audit loads as the reference model: the recorded id, resolved to the embedded copy
    reference = loading.load_base_model(json.loads((moved / "model" / "dpft-model.json").read_text())["base_model"])
    assert reference.model.config.vocab_size == tiny_llama().config.vocab_size


def test_full_model_card_has_no_peft_library(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path / "run")
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a base\n")
    save_model(paths, tiny_llama(), tiny_tokenizer(), "full", str(base))
    write_model_card(paths, REPORT, str(base))
    meta = front_matter(paths.card.read_text())
    assert meta == {"base_model": str(base), "license": "mit", "tags": ["differential-privacy", "dpft"]}
    assert load_run_model(paths.root).model.config.vocab_size == tiny_llama().config.vocab_size
