"""LoRA-drop (optionally with DropLoRA) on a causal LM, fine-tuned by TRL's ``SFTTrainer``.

    pip install 'loradrop[trl]'
    python examples/sft_trl.py --out runs/sft-gsm         # bundled SmolLM2-135M on the bundled gsm task
    python examples/sft_trl.py --out runs/sft --model DIR --data train.jsonl --prompt-column q --response-column a

1. ``evaluate_importance`` trains LoRA briefly on the alpha sample and measures each layer's importance;
2. ``apply_plan`` keeps the important layers' LoRA, lets the others share one, and turns DropLoRA's
   rank mask on (``--rank-dropout``). It returns a PEFT model, which goes to ``SFTTrainer`` as it is,
   without a ``peft_config`` (TRL refuses one together with a model that already has LoRA);
3. ``SFTTrainer`` tokenizes prompt-completion rows itself and takes the loss on the completion tokens
   only; ``prompt_completion`` gives it rows whose tokens and labels equal what the probe saw;
4. the trained adapter is saved compact (each shared LoRA once) and as a plain PEFT adapter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import DatasetDict
from trl import SFTConfig, SFTTrainer

import loradrop
from loradrop.models import load_causal_lm
from loradrop.tasks.generation import encode_example, generation_collator, prompt_completion, tokenize_generation
from loradrop.tasks.registry import load_task
from loradrop.tasks.user_generation import load_user_generation_task


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="writes OUT/adapter (compact) and OUT/peft (PEFT format)")
    p.add_argument("--model", default="smollm2", help="bundled model name, causal-LM folder or hub id")
    p.add_argument("--task", default="gsm", help="bundled generation task (when --data is not given)")
    p.add_argument("--data", help="JSONL/JSON/CSV file of prompt/response rows or chats")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--response-column", default="response")
    p.add_argument("--messages-column", help="chat rows: the column of turns, the last one the assistant's")
    p.add_argument("--max-length", type=int, default=384, help="longer examples are left out (probe and training)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--threshold", type=float, default=0.9, help="LoRA-drop's cumulative importance T")
    p.add_argument("--sample-ratio", type=float, default=0.1, help="the probe's share alpha of the training data")
    p.add_argument("--probe-max-steps", type=int, help="cap on the probe's steps (default: 3 epochs of the sample)")
    p.add_argument("--rank-dropout", type=float, default=0.0, help="DropLoRA's rank-mask probability p (0: off)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_data(args: argparse.Namespace) -> DatasetDict:
    """``train`` and ``validation`` with columns prompt (or messages) and response."""
    if args.data:
        return load_user_generation_task(args.data, args.prompt_column, args.response_column, args.messages_column,
                                         seed=args.seed)[1]
    return load_task(args.task, seed=args.seed)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, tokenizer = load_causal_lm(args.model)
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # the probe runs where the model is
    # Longer examples are left out of both stages rather than cut: a cut response would lose its answer.
    data = load_data(args).filter(lambda row: len(encode_example(row, tokenizer)["input_ids"]) <= args.max_length)

    cfg = loradrop.LoraDropConfig(r=args.r, lora_alpha=2 * args.r, threshold=args.threshold,
                                  sample_ratio=args.sample_ratio, probe_max_steps=args.probe_max_steps,
                                  probe_batch_size=args.batch_size, rank_dropout=args.rank_dropout, seed=args.seed)
    probe_data, _ = tokenize_generation(data, tokenizer, args.max_length)
    result = loradrop.evaluate_importance(model, probe_data["train"], cfg, collate_fn=generation_collator(tokenizer),
                                          show_progress=True)
    model = loradrop.apply_plan(model, result, cfg)
    print(loradrop.summary(model))

    sft_data = data.map(lambda row: prompt_completion(row, tokenizer), remove_columns=data["train"].column_names)
    sft_args = SFTConfig(
        output_dir=str(args.out / "trainer"), num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate, max_length=args.max_length, seed=args.seed, logging_steps=10,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # TRL's default would autocast a CPU
        save_strategy="no", report_to=[])
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=sft_data["train"],
                         eval_dataset=sft_data["validation"], processing_class=tokenizer)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    print(f"validation loss per completion token: {before:.4f} before, {trainer.evaluate()['eval_loss']:.4f} after")

    loradrop.save_adapter(model, args.out / "adapter")
    loradrop.export_peft(model, args.out / "peft")
    print(f"saved {args.out / 'adapter'} (compact) and {args.out / 'peft'} (PEFT)")


if __name__ == "__main__":
    main()
