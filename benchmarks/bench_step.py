"""Training-step speed and memory of loradrop against PEFT, on a Llama-shaped model, in one run.

Every variant trains the same random bf16 base on the same batch: median step time (forward,
backward, AdamW) over timed steps after warm-up, peak GPU memory, tokens/s, and the ratio to the
floor -- the frozen base's forward plus the input-gradient backward that every LoRA method must do.
Also the compact adapter's bytes against a PEFT adapter of the same config.

    python benchmarks/bench_step.py --shape 7b --out results.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import loradrop  # noqa: E402
from loradrop import LoraDropConfig, Plan, apply_plan, find_sites  # noqa: E402
from loradrop.sites import site_layers  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def build_base(shape: str) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **SHAPES[shape])
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.requires_grad_(False)
    return model


def time_steps(step, warmup: int, steps: int) -> tuple[float, float]:
    """Median ms of ``step`` and peak GiB allocated while it ran."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def make_step(model, batch, autocast: bool, optimizer=None):
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def step():
        with ctx():
            loss = model(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def half_plan(model) -> Plan:
    """Every other layer of each type keeps its own LoRA: about half retained, as LoRA-drop at T=0.9."""
    layers = site_layers(find_sites(model))
    return Plan(layers=layers, retained={t: ls[::2] for t, ls in layers.items()}, threshold=0.9)


def full_plan(model) -> Plan:
    layers = site_layers(find_sites(model))
    return Plan(layers=layers, retained=layers, threshold=1.0)


def lora_config(r: int) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM")


def run_variant(base, name, batch, r, warmup, steps, results):
    """Builds one variant on ``base``, times it, then removes every trace of it from ``base``."""
    ld_cfg = LoraDropConfig(target_modules=TARGETS, r=r, lora_alpha=2 * r, seed=0)
    probe = contextlib.nullcontext()
    autocast = True
    if name == "floor":
        base.enable_input_require_grads()
        model, optimizer = base, None
        autocast = False
    elif name == "peft-bf16-adapters":
        model = get_peft_model(base, lora_config(r), autocast_adapter_dtype=False)
        autocast = False
    elif name == "peft-fp32-adapters+autocast":
        model = get_peft_model(base, lora_config(r))
    elif name == "peft-fp32+autocast+lora_dropout0.05":
        cfg = lora_config(r)
        cfg.lora_dropout = 0.05
        model = get_peft_model(base, cfg)
    else:  # loradrop variants: fp32 adapters + autocast, the Trainer setting
        model = get_peft_model(base, lora_config(r))
        plan = half_plan(model) if name.startswith("loradrop-lora-drop") else full_plan(model)
        if name.endswith("rank-dropout0.5"):
            ld_cfg = LoraDropConfig(target_modules=TARGETS, r=r, lora_alpha=2 * r, seed=0, rank_dropout=0.5)
        model = apply_plan(model, plan, ld_cfg)
        if name.endswith("probe-hooks"):
            probe = loradrop.ImportanceProbe(model)
    if name != "floor":
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    with probe:  # the probe's hooks stay on for all timed steps, as during a probe run
        ms, gib = time_steps(make_step(model, batch, autocast, optimizer), warmup, steps)
    tokens = batch["input_ids"].numel()
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    results.append({"variant": name, "ms": ms, "peak_gib": gib, "tokens_per_s": tokens / ms * 1e3,
                    "lora_parameters": lora})
    print(f"  {name:<40} {ms:8.1f} ms {gib:7.2f} GiB {tokens / ms * 1e3:10.0f} tok/s  lora {lora:,}", flush=True)
    if name == "floor":
        base.disable_input_require_grads()
    else:
        del optimizer
        loradrop.remove_rank_dropout(model)
        model.unload()
    base.zero_grad(set_to_none=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def adapter_bytes(base, r: int) -> dict:
    """Compact LoRA-drop adapter (half the layers retained) against PEFT's adapter of the same config."""
    ld_cfg = LoraDropConfig(target_modules=TARGETS, r=r, lora_alpha=2 * r, seed=0)
    model = get_peft_model(base, lora_config(r))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(f"{tmp}/peft")
        peft_bytes = Path(f"{tmp}/peft/adapter_model.safetensors").stat().st_size
        model = apply_plan(model, half_plan(model), ld_cfg)
        loradrop.save_adapter(model, f"{tmp}/compact")
        compact = Path(f"{tmp}/compact/adapter_model.safetensors").stat().st_size
    model.unload()
    return {"peft_bytes": peft_bytes, "compact_bytes": compact, "ratio": compact / peft_bytes}


VARIANTS = ["floor", "peft-fp32-adapters+autocast", "peft-bf16-adapters", "peft-fp32+autocast+lora_dropout0.05",
            "loradrop-lora", "loradrop-lora-drop", "loradrop-lora-drop+rank-dropout0.5", "loradrop-lora+probe-hooks"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, nargs="+", default=["7b", "1b"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__, "loradrop": loradrop.__version__,
                           "python": platform.python_version()},
              "batch": args.batch, "seq": args.seq, "r": args.r, "shapes": {}}
    for shape in args.shape:
        print(f"shape {shape}: {SHAPES[shape]}", flush=True)
        base = build_base(shape)
        torch.manual_seed(0)
        ids = torch.randint(0, 32000, (args.batch, args.seq), device="cuda")
        batch = {"input_ids": ids, "labels": ids}
        results: list[dict] = []
        for name in VARIANTS:
            run_variant(base, name, batch, args.r, args.warmup, args.steps, results)
        floor = results[0]["ms"]
        for row in results:
            row["x_floor"] = row["ms"] / floor
        report["shapes"][shape] = {"config": SHAPES[shape], "variants": results, "adapter": adapter_bytes(base, args.r)}
        del base
        gc.collect()
        torch.cuda.empty_cache()
        args.out.write_text(json.dumps(report, indent=2))
    print()
    for shape, data in report["shapes"].items():
        print(f"{shape}: {'variant':<40} {'ms':>8} {'x floor':>8} {'GiB':>7} {'tok/s':>9}")
        for row in data["variants"]:
            print(f"    {row['variant']:<40} {row['ms']:8.1f} {row['x_floor']:8.3f} {row['peak_gib']:7.2f} {row['tokens_per_s']:9.0f}")
        a = data["adapter"]
        print(f"    adapter: compact {a['compact_bytes']:,} B / PEFT {a['peft_bytes']:,} B = {a['ratio']:.3f}")


if __name__ == "__main__":
    main()
