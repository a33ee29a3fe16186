"""DP fine-tuning in your own transformers Trainer script: `DPTrainer` + `PrivacyArguments`.

    python examples/hf_trainer.py --output runs/hf-lora            # embedded SmolLM2, bundled data
    python examples/hf_trainer.py --model path/to/tiny --max-steps 2 --output /tmp/run
    python examples/hf_trainer.py --output runs/hf-lora --resume   # after a crash: same settings, same data
    torchrun --nproc-per-node 2 examples/hf_trainer.py --output runs/hf-ddp   # data parallel

The run directory gets what `dpft train` writes: model/ (adapter + model card), privacy.json,
metrics.jsonl and private/ (journal, per-step losses: keep it with the data).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainingArguments

from dpft.hf import DPTrainer, PrivacyArguments
from dpft.models import load_base_model, with_lora
from dpft.models.embedded import EMBEDDED_NAME

HERE = Path(__file__).parent


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED_NAME, help="hub id or path (default: the embedded model)")
    parser.add_argument("--data", default=str(HERE / "medical" / "train.jsonl"))
    parser.add_argument("--output", required=True)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=64, help="expected logical batch (Poisson)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--privacy-unit", choices=("record", "user"), default="record")
    parser.add_argument("--unsafe-seed", type=int, default=None, help="UNSAFE: tests only")
    parser.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps (private/checkpoints)")
    parser.add_argument("--resume", action="store_true", help="continue the unfinished run in --output")
    a = parser.parse_args(argv)

    torch.manual_seed(0)  # the adapters' initialisation (public)
    loaded = load_base_model(a.model)
    model = with_lora(loaded.model, r=8, alpha=16.0, targets="q_proj,v_proj")
    rows = [json.loads(line) for line in Path(a.data).read_text().splitlines() if line.strip()]
    columns = sorted(set().union(*rows))  # a file may mix formats: every row gets every column (None if absent)
    records = Dataset.from_list([{c: row.get(c) for c in columns} for row in rows])

    args = TrainingArguments(
        output_dir=a.output,
        per_device_train_batch_size=a.micro_batch_size,  # the micro-batch: memory only
        num_train_epochs=a.epochs,
        max_steps=a.max_steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="steps",  # dpft's checkpoint (private/checkpoints), the newest only
        save_steps=a.save_steps,
        report_to=[],  # trackers get ε, step and learning rate only
        use_cpu=not torch.cuda.is_available(),
    )
    privacy = PrivacyArguments(
        target_epsilon=a.epsilon,
        delta=a.delta,
        expected_batch_size=a.batch_size,
        privacy_unit=a.privacy_unit,
        unsafe_seed=a.unsafe_seed,
    )
    trainer = DPTrainer(
        model=model, args=args, train_dataset=records, processing_class=loaded.tokenizer, privacy_args=privacy
    )
    trainer.train(resume_from_checkpoint=a.resume)
    report = json.loads((Path(a.output) / "privacy.json").read_text())
    print(f"ε = {report['epsilon']:.3g} at δ = {report['delta']:g} after {report['steps']} steps ({a.output})")
    return report


if __name__ == "__main__":
    main()
