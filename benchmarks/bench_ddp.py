"""Data-parallel scaling of a LoRA-drop + DropLoRA training step (torch DDP, one process a GPU).

    torchrun --nproc_per_node N benchmarks/bench_ddp.py --shape 7b --out ddpN.json

Each rank holds the bf16 base of ``bench_step.py``'s shape with LoRA-drop's half plan (shared LoRA)
and rank dropout p = 0.5, wrapped in DDP; median step time over timed steps, global tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model

from bench_step import SHAPES, TARGETS, build_base, half_plan, lora_config, make_step, time_steps

from loradrop import LoraDropConfig, apply_plan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    base = build_base(args.shape)
    cfg = LoraDropConfig(target_modules=TARGETS, r=args.r, lora_alpha=2 * args.r, seed=0, rank_dropout=0.5)
    model = get_peft_model(base, lora_config(args.r))
    plan = half_plan(model)
    model = apply_plan(model, plan, cfg)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.manual_seed(1000 + rank)  # each rank its own data and its own rank-dropout masks
    ids = torch.randint(0, 32000, (args.batch, args.seq), device="cuda")
    ddp.train()
    ms, gib = time_steps(make_step(ddp, {"input_ids": ids, "labels": ids}, True, optimizer), 3, args.steps)
    times = [None] * world
    dist.all_gather_object(times, ms)
    if rank == 0:
        tokens = world * ids.numel()
        result = {"gpus": world, "shape": args.shape, "gpu": torch.cuda.get_device_name(), "step_ms": max(times),
                  "per_rank_ms": times, "peak_gib_rank0": gib, "global_tokens_per_s": tokens / max(times) * 1e3,
                  "plan_retained": plan.retained}
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "plan_retained"}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
