"""DP supervised fine-tuning with TRL: `DPSFTTrainer` (an `SFTTrainer`) + `PrivacyArguments`.

    pip install 'dpft[trl]'
    python examples/trl_sft.py --output runs/sft                   # embedded SmolLM2, bundled records
    python examples/trl_sft.py --model path/to/tiny --max-steps 2 --output /tmp/sft

Chat records (`messages`) are trained with the loss on the assistant turns; packing is refused.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig

from dpft.hf import DPSFTTrainer, PrivacyArguments
from dpft.models import load_base_model, with_lora
from dpft.models.embedded import EMBEDDED_NAME
from dpft.models.precision import native_bf16

HERE = Path(__file__).parent
FORMAT_KEYS = {"text", "prompt", "completion", "messages"}  # what names a record's format


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_NAME, help="hub id or path (default: the embedded model)")
    parser.add_argument("--data", default=str(HERE / "medical" / "train.jsonl"), help="records or chats (.jsonl)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=64, help="expected logical batch (Poisson)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--unsafe-seed", type=int, default=None, help="UNSAFE: tests only")
    a = parser.parse_args(argv)

    torch.manual_seed(0)
    loaded = load_base_model(a.model)
    model = with_lora(loaded.model, r=8, alpha=16.0, targets="q_proj,v_proj")
    rows = [json.loads(line) for line in Path(a.data).read_text().splitlines() if line.strip()]
    # TRL reads one record format per dataset (a "text" column wins over prompt/completion, and a row
    # without text then breaks it): keep the file's most common format, e.g. the bundled medical file's
    # prompt/completion records without its text canaries.
    formats = Counter(frozenset(k for k in r if k in FORMAT_KEYS) for r in rows)
    keep = formats.most_common(1)[0][0]
    rows = [r for r in rows if frozenset(k for k in r if k in FORMAT_KEYS) == keep]
    columns = sorted(set().union(*rows))
    records = Dataset.from_list([{c: row.get(c) for c in columns} for row in rows])

    config = SFTConfig(
        output_dir=a.output,
        per_device_train_batch_size=a.micro_batch_size,
        num_train_epochs=a.epochs,
        max_steps=a.max_steps,
        max_length=a.max_length,
        learning_rate=a.lr,
        lr_scheduler_type="constant",  # few noisy steps: a decay to 0 spends half of them at a tiny lr
        packing=False,  # packing mixes privacy units in one row: refused
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        # TRL turns bf16 on by default; the DP drop-in refuses it where it would be emulated
        bf16=native_bf16("cuda" if torch.cuda.is_available() else "cpu"),
    )
    privacy = PrivacyArguments(
        target_epsilon=a.epsilon, delta=a.delta, expected_batch_size=a.batch_size, unsafe_seed=a.unsafe_seed
    )
    trainer = DPSFTTrainer(
        model=model, args=config, train_dataset=records, processing_class=loaded.tokenizer, privacy_args=privacy
    )
    trainer.train()
    report = json.loads((Path(a.output) / "privacy.json").read_text())
    print(f"ε = {report['epsilon']:.3g} at δ = {report['delta']:g} after {report['steps']} steps ({a.output})")
    return report


if __name__ == "__main__":
    main()
