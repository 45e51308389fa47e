"""Where a training step's time goes: GPU time by aten op and input shapes, kernel count, and host time per
step, for chosen variants of ``bench_step.py`` (same model, batch and variant definitions).

    python benchmarks/profile_step.py --shape 7b --variants floor "fast lora-drop+rank-dropout0.5 fp32+autocast"
"""

from __future__ import annotations

import argparse
import bisect
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_step import SHAPES, VARIANTS, build, build_base, loradrop, teardown


def idle_gaps(prof, top: int = 15) -> dict:
    """Where the GPU waits for the host inside the profiled step: the idle time between consecutive
    kernels, summed by the host op (innermost, and its parent) that launched the kernel after the gap."""
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    ops: dict = {}  # per host thread, its ops by start time
    for e in sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: e["ts"]):
        ops.setdefault(e["tid"], []).append(e)
    starts = {tid: [e["ts"] for e in thread] for tid, thread in ops.items()}

    def enclosing(launch: dict) -> list[str]:  # innermost first, at most two
        thread, names = ops.get(launch["tid"], []), []
        i = bisect.bisect_right(starts.get(launch["tid"], []), launch["ts"]) - 1
        while i >= 0 and len(names) < 2:
            if thread[i]["ts"] + thread[i]["dur"] >= launch["ts"]:
                names.append(thread[i]["name"])
            i -= 1
        return names

    by_op: dict[str, float] = {}
    for prev, nxt in zip(kernels, kernels[1:]):
        gap = nxt["ts"] - (prev["ts"] + prev["dur"])
        launch = launches.get(nxt.get("args", {}).get("correlation"))
        if gap <= 0 or launch is None:
            continue
        key = " < ".join(enclosing(launch)) or "(no op)"
        by_op[key] = by_op.get(key, 0.0) + gap
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    idle = sum(by_op.values())
    rows = sorted(({"launched_in": k, "idle_ms": v / 1e3} for k, v in by_op.items()), key=lambda r: -r["idle_ms"])
    return {"span_ms": span / 1e3, "idle_ms": idle / 1e3, "by_launching_op": rows[:top]}


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
    gaps = idle_gaps(prof)
    del step
    teardown(base, variant, model)
    return {"variant": variant.name, "gpu_ms": total, "kernels": count, "host_ms": sorted(host)[1], "top": rows,
            "idle": gaps}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    base = build_base(args.shape)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (4, 1024), device="cuda")
    batch = {"input_ids": ids, "labels": ids}
    by_name = {v.name: v for v in VARIANTS}
    variants = sorted((by_name[name] for name in args.variants), key=lambda v: v.liger)  # Liger's patch is for good
    report = []
    for v in variants:
        if v.liger and not any(prev.liger for prev in variants[:variants.index(v)]):
            loradrop.apply_liger(base)
        report.append(profile_variant(base, v, batch, args.r, args.top))
    args.out.write_text(json.dumps(report, indent=2))
    for row in report:
        print(f"\n{row['variant']}: GPU {row['gpu_ms']:.1f} ms in {row['kernels']} kernels, host {row['host_ms']:.1f} ms/step")
        for k in row["top"]:
            print(f"  {k['ms']:8.2f} ms {k['count']:6d}  {k['name']}")
        idle = row["idle"]
        print(f"  GPU idle {idle['idle_ms']:.1f} ms of a {idle['span_ms']:.1f} ms span; by the host op launching the next kernel:")
        for k in idle["by_launching_op"]:
            print(f"  {k['idle_ms']:8.2f} ms  {k['launched_in']}")


if __name__ == "__main__":
    main()
