"""Model loading: any Hugging Face causal LM by hub id or path, and the embedded default."""

from dpft.models.loading import LoadedModel, load_base_model, load_run_model, with_lora

__all__ = ["LoadedModel", "load_base_model", "load_run_model", "with_lora"]
