"""Where a training step's time goes: GPU time by aten op and input shapes, kernel count, and host time per
step, for chosen variants of ``bench_step.py`` (same model, batch and variant definitions).

    python benchmarks/profile_step.py --shape 7b --variants floor "fast lora-drop+rank-dropout0.5 fp32+autocast"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_step import SHAPES, VARIANTS, build, build_base, teardown


def profile_variant(base, variant, batch, r: int, top: int) -> dict:
    model, step = build(base, variant, r, batch)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    host = []
    for _ in range(3):  # host time to issue a step while the GPU is still busy with earlier work
        start = time.perf_counter()
        step()
        host.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels) / 1e3
    count = sum(e.count for e in kernels)
    ops = [e for e in prof.key_averages(group_by_input_shape=True)
           if e.device_type.name == "CPU" and e.key.startswith("aten::") and e.self_device_time_total > 0]
    rows = sorted(({"name": f"{e.key} {e.input_shapes}"[:150], "ms": e.self_device_time_total / 1e3, "count": e.count}
                   for e in ops), key=lambda row: -row["ms"])[:top]
    del step
    teardown(base, variant, model)
    return {"variant": variant.name, "gpu_ms": total, "kernels": count, "host_ms": sorted(host)[1], "top": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    base = build_base(args.shape)
    ids = torch.randint(0, 32000, (4, 1024), device="cuda")
    batch = {"input_ids": ids, "labels": ids}
    by_name = {v.name: v for v in VARIANTS}
    report = [profile_variant(base, by_name[name], batch, args.r, args.top) for name in args.variants]
    args.out.write_text(json.dumps(report, indent=2))
    for row in report:
        print(f"\n{row['variant']}: GPU {row['gpu_ms']:.1f} ms in {row['kernels']} kernels, host {row['host_ms']:.1f} ms/step")
        for k in row["top"]:
            print(f"  {k['ms']:8.2f} ms {k['count']:6d}  {k['name']}")


if __name__ == "__main__":
    main()
