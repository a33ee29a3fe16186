"""Text generation from a model: raw prompt or chat message, greedy or sampled."""

from __future__ import annotations

import torch

from dpft.models.precision import autocast


@torch.inference_mode()
def generate_text(
    model,
    tokenizer,
    *,
    prompt: str | None = None,
    chat: str | None = None,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> str:
    """Continue `prompt` as raw text, or answer `chat` through the tokenizer's chat template.

    `dtype` is the compute dtype (`precision.resolve_dtype`): bf16 autocasts the matmuls.
    """
    if chat is not None:
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": chat}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    torch.manual_seed(seed)
    sampling = temperature > 0
    with autocast(dtype):
        out = model.eval().generate(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
