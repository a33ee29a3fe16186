"""Load a causal LM and its tokenizer; wrap it with LoRA adapters through peft."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dpft.errors import DpftError
from dpft.models.embedded import EMBEDDED_NAME, embedded_model_dir
from dpft.models.precision import DTYPES
from dpft.run_layout import RunPaths

# The public id of the model the embedded copy was made from (a Q4_1 GGUF of it, dequantised):
# what a run's model folder records as its base, so the folder is portable; `load_run_model`
# resolves it to the embedded copy, offline.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_LICENSE = "apache-2.0"
AUTO_TARGETS = "auto"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for (hub id, path, or the embedded name)


def resolve_model_path(name: str) -> str:
    """Map the embedded model's name, or the hub id its run folders record (`EMBEDDED_HUB_ID`), to
    its safetensors cache; leave other hub ids and paths as they are.

    The hub id resolves to the embedded copy so that what a run folder records as its base (read
    back by `load_run_model` and by the audit's reference model) is the very base it was trained
    on, offline: the embedded copy is a dequantised Q4_1 GGUF, not the hub's own weights.
    """
    return str(embedded_model_dir()) if name in (EMBEDDED_NAME, EMBEDDED_HUB_ID) else name


def load_base_model(name: str = EMBEDDED_NAME, dtype: str = "fp32") -> LoadedModel:
    """Load a causal LM by hub id, local path, or the embedded name `smollm2-135m-instruct`.

    Args:
        dtype: the weights' storage dtype (`--weights-dtype`), fp32 or bf16; the compute dtype is
            `precision.resolve_dtype`'s business.

    Raises:
        DpftError: unknown dtype, or a model that cannot be found or loaded (no hub access here).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise DpftError(f"--weights-dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except OSError as err:  # missing path, or a hub id with no network
        raise DpftError(f"--model {name}: cannot load ({_first_line(err)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name)


def with_lora(
    model: torch.nn.Module,
    r: int,
    alpha: float,
    targets: str,
    dropout: float = 0.0,
    last_layers: int | None = None,
):
    """Freeze the base model and add trainable LoRA adapters (peft).

    Args:
        targets: comma-separated module names (e.g. "q_proj,v_proj"), "all-linear", or "auto"
            (`auto_targets`: peft's usual targets for the architecture, else all linear layers).
        last_layers: adapt only the last N transformer blocks. Nothing below them needs a
            gradient, so the backward pass stops there (top half of SmolLM2: steps ~1.4x faster).

    Raises:
        DpftError: targets that match no module, or a bad --lora-layers.
    """
    from peft import LoraConfig, get_peft_model

    if targets.strip() == AUTO_TARGETS:
        modules = auto_targets(model)
    else:
        modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    layers = None
    if last_layers is not None:
        total = _num_blocks(model)
        if not 1 <= last_layers <= total:
            raise DpftError(f"--lora-layers must be between 1 and {total} (the model's blocks), not {last_layers}")
        layers = list(range(total - last_layers, total))
        if modules == "all-linear":  # peft takes a layer subset only with explicit module names
            modules = _block_linear_names(model)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=modules,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise DpftError(f"--lora-targets {targets}: {_first_line(err)}") from None


def auto_targets(model: torch.nn.Module) -> list[str] | str:
    """peft's default LoRA targets for the model's architecture where it has them and the model has
    those modules (Llama: q_proj, v_proj; GPT-2: c_attn; Falcon, GPT-NeoX, BLOOM: query_key_value),
    else "all-linear" (Phi-3, Qwen2-MoE, unknown architectures)."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING
    except ImportError:  # peft moved it: all linear layers is always a valid choice
        MAPPING = {}
    known = MAPPING.get(getattr(getattr(model, "config", None), "model_type", None))
    linear = _block_linear_names(model)
    if known and set(known) <= set(linear):
        return sorted(known)
    # By name, not peft's "all-linear": that also wraps fused mixture-of-experts weights, which
    # dpft cannot clip. A name that also names some other module (a router) is left out.
    others = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if not _is_linear(m)}
    names = [n for n in linear if n not in others]
    return names or "all-linear"


def _is_linear(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def _num_blocks(model: torch.nn.Module) -> int:
    config = model.config
    total = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not total:
        raise DpftError("--lora-layers: the model's config names no number of layers")
    return int(total)


def _block_linear_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers inside the transformer blocks (what "all-linear" adapts)."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output
        }
    )


def load_run_model(run_dir: str | Path, dtype: str = "fp32") -> LoadedModel:
    """Load the model trained in a dpft run directory (adapter merged onto its base, or full weights).

    Raises:
        DpftError: not a run directory, or its files are incomplete.
    """
    run = Path(run_dir)
    meta_path = RunPaths(run).model_meta
    if not meta_path.is_file():
        raise DpftError(f"{run}: not a dpft run directory (no model/dpft-model.json); did training finish?")
    meta = json.loads(meta_path.read_text())
    if meta["kind"] == "full":
        loaded = load_base_model(str(RunPaths(run).model), dtype)
    else:
        from peft import PeftModel

        loaded = load_base_model(meta["base_model"], dtype)  # the embedded copy by its hub id: offline
        loaded.model = PeftModel.from_pretrained(loaded.model, RunPaths(run).model).merge_and_unload()
    loaded.source = str(run)
    return loaded


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
