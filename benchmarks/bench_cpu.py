"""The fast path against PEFT's forward on the CPU: training-step time of the bundled MiniLM
classifier and of small Llama / BERT models built from configs, float32, in one run.

Both forwards train the same model on the same batch; rounds alternate between them so that drift
in the machine's speed hits both alike. The ratio fast / PEFT is the median over rounds.

    python benchmarks/bench_cpu.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import peft
import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import loradrop  # noqa: E402
from bench_step import half_plan  # noqa: E402 (every other layer retained, as LoRA-drop at T = 0.9)
from loradrop import LoraDropConfig, apply_plan, disable_fast_path, enable_fast_path  # noqa: E402
from loradrop.models import load_classifier  # noqa: E402
from loradrop.sites import add_lora  # noqa: E402


def minilm():
    return load_classifier("minilm", 2)[0], ["query", "value"]


def small_llama():
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4)
    return LlamaForCausalLM(cfg), ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def tiny_bert():  # the test suite's size
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=48)
    return BertForSequenceClassification(cfg), ["query", "value"]


MODELS = {"minilm": minilm, "small-llama": small_llama, "tiny-bert": tiny_bert}


def build(name: str, rank_dropout: float):
    torch.manual_seed(0)
    base, targets = MODELS[name]()
    base.requires_grad_(False)
    cfg = LoraDropConfig(target_modules=targets, r=8, lora_alpha=16, rank_dropout=rank_dropout)
    peft_model = add_lora(base, cfg)
    model = apply_plan(peft_model, half_plan(peft_model), cfg)
    model.train()
    return model


def batch_for(name: str, model, batch: int, seq: int) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    labels = ids if name == "small-llama" else torch.randint(0, 2, (batch,))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def time_step(model, batch, optimizer, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank-dropout", type=float, default=0.5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__, "loradrop": loradrop.__version__},
              "batch": args.batch, "seq": args.seq, "rank_dropout": args.rank_dropout, "models": {}}
    for name in args.models:
        model = build(name, args.rank_dropout)
        batch = batch_for(name, model, args.batch, args.seq)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times = {"peft": [], "fast": []}
        time_step(model, batch, optimizer, 2)  # warm-up
        for _ in range(args.rounds):
            for path in ("peft", "fast"):
                (enable_fast_path if path == "fast" else disable_fast_path)(model)
                times[path].append(time_step(model, batch, optimizer, args.steps))
        ratios = [f / p for f, p in zip(times["fast"], times["peft"])]
        row = {"peft_ms": statistics.median(times["peft"]), "fast_ms": statistics.median(times["fast"]),
               "ratio_median": statistics.median(ratios), "ratios": ratios}
        report["models"][name] = row
        print(f"{name:<12} PEFT {row['peft_ms']:8.1f} ms  fast {row['fast_ms']:8.1f} ms  fast/PEFT "
              f"{row['ratio_median']:.3f} (rounds {min(ratios):.3f}..{max(ratios):.3f})", flush=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
