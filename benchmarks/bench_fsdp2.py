"""FSDP2 + LoRA-drop against FSDP2 + PEFT LoRA (and DDP where the model fits): step time and peak
memory per GPU, on a Llama-shaped model with random bf16 weights, one process per GPU.

    torchrun --nproc_per_node N benchmarks/bench_fsdp2.py --shape 7b  --method loradrop --out fsdp2_7b_ld.json
    torchrun --nproc_per_node N benchmarks/bench_fsdp2.py --shape 7b  --method peft     --out fsdp2_7b_peft.json
    torchrun --nproc_per_node N benchmarks/bench_fsdp2.py --shape 34b --method loradrop --out fsdp2_34b_ld.json
    torchrun --nproc_per_node N benchmarks/bench_fsdp2.py --shape 7b  --method loradrop --parallel ddp --out ddp_7b.json

Every rank builds the bf16 base, gets LoRA r = 64 on q, k, v, o, up, down (fp32 masters) and is
sharded layer by layer with ``loradrop.shard_model`` (``--method loradrop``: every other layer of each
type keeps its LoRA, the rest share one, kept replicated; DropLoRA p = 0.5; loradrop's fused forward;
``--method peft``: plain PEFT LoRA on PEFT's own forward) with bf16 parameters, float32 gradient reduction, non-reentrant gradient
checkpointing and bf16 autocast, as ``loradrop train`` runs under ``accelerate launch`` with FSDP2.
Median time of a whole step (forward, backward, AdamW) over timed steps after warm-up, each rank's
peak allocated memory, global tokens/s; rank 0 writes the JSON. ``--device cpu --shape tiny`` is a
smoke run on gloo (2 CPU processes), which checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import peft
import torch
import torch.distributed as dist
import transformers
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import MixedPrecisionPolicy
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from loradrop import (  # noqa: E402
    LoraDropConfig, Plan, apply_plan, disable_fast_path, find_sites, lora_parameter_count, shard_model,
)
from loradrop.sites import site_layers  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
    "34b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64,
                num_key_value_heads=8),  # CodeLlama-34B
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
VOCAB = 32000


def build_base(shape: str, device: torch.device) -> LlamaForCausalLM:
    """Random bf16 weights built in bf16 on ``device`` (a float32 34B would not fit), frozen."""
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, **SHAPES[shape])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.requires_grad_(False)


def half_plan(model) -> Plan:
    """Every other layer of each type keeps its own LoRA: about half retained, as LoRA-drop at T = 0.9."""
    layers = site_layers(find_sites(model))
    return Plan(layers=layers, retained={t: ls[::2] for t, ls in layers.items()}, threshold=0.9)


def build_model(method: str, base: LlamaForCausalLM, r: int) -> tuple[torch.nn.Module, Plan | None]:
    """PEFT LoRA with fp32 masters on ``base``; for ``loradrop`` the half plan and rank dropout on top."""
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM"))
    if method == "peft":
        return disable_fast_path(model), None  # PEFT's own forward at every site
    plan = half_plan(model)
    cfg = LoraDropConfig(target_modules=TARGETS, r=r, lora_alpha=2 * r, seed=0, rank_dropout=0.5)
    return apply_plan(model, plan, cfg), plan


def distribute(model: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    """FSDP2 through loradrop.shard_model (bf16 parameters, float32 reduction), or DDP."""
    if parallel == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return shard_model(model, mp_policy=policy)


def time_steps(step, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """Median ms of ``step`` and peak GiB allocated on ``device`` while it ran (0 on a CPU)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0


def make_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, device: torch.device):
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--method", choices=("loradrop", "peft"), default="loradrop")
    parser.add_argument("--parallel", choices=("fsdp2", "ddp"), default="fsdp2")
    parser.add_argument("--batch", type=int, default=4, help="sequences per GPU")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-checkpointing", action="store_true", help="keep activations (no gradient checkpointing)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    torch.manual_seed(0)  # the same base and LoRA on every rank
    model, plan = build_model(args.method, build_base(args.shape, device), args.r)
    if not args.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_params = lora_parameter_count(model)
    model = distribute(model, args.parallel, device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  fused=device.type == "cuda")
    torch.manual_seed(1000 + rank)  # each rank its own data and its own rank-dropout masks
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), device=device)
    ms, gib = time_steps(make_step(model, {"input_ids": ids, "labels": ids}, optimizer, device),
                         args.warmup, args.steps, device)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"step_ms": ms, "peak_gib": gib})
    if rank == 0:
        step_ms = max(r["step_ms"] for r in per_rank)
        result = {
            "shape": args.shape, "method": args.method, "parallel": args.parallel, "gpus": world,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "batch_per_gpu": args.batch, "seq": args.seq, "r": args.r, "gradient_checkpointing": not args.no_checkpointing,
            "step_ms": step_ms, "peak_gib_max": max(r["peak_gib"] for r in per_rank), "per_rank": per_rank,
            "global_tokens_per_s": world * ids.numel() / step_ms * 1e3, "lora_parameters": lora_params,
            "plan_retained": plan.retained if plan else None,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        }
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k not in ("plan_retained", "per_rank")}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
