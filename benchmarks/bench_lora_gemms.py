"""The fast path's skinny GEMMs one by one, in each memory layout cuBLAS can be asked for, against the
bytes they must move; and AdamW's step over the 7B shape's LoRA parameters, foreach against fused.

A LoRA site's GEMMs are memory-bound (one side is r = 64 wide), so what matters is how close each call
comes to the card's bandwidth; the r-wide operands (h, dh, dA, dB) may be kept in either layout.

    python benchmarks/bench_lora_gemms.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

TOKENS, RANK = 4096, 64
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (d_in, d_out) of q/k/v/o, up, down


def gpu_ms(fn, reps: int = 15, calls: int = 20) -> float:
    """Median GPU ms of one call, timed over ``calls`` back-to-back calls so launch latency hides."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def random_bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)


def gemm_rows(d_in: int, d_out: int) -> list[dict]:
    t = random_bf16
    x, dy, w = t(TOKENS, d_in), t(TOKENS, d_out), t(d_out, d_in)
    a, b = t(RANK, d_in), t(d_out, RANK)
    h, dh = t(TOKENS, RANK), t(TOKENS, RANK)
    h_t, dh_t = h.t().contiguous(), dh.t().contiguous()  # the same values kept r x tokens
    y = t(TOKENS, d_out)
    cases = {
        "h = x A^T": {"F.linear(x, A)": lambda: torch.mm(x, a.t()), "A x^T (h^T)": lambda: torch.mm(a, x.t())},
        "z = h B^T": {"h B^T": lambda: torch.mm(h, b.t()), "(h^T)^T B^T": lambda: torch.mm(h_t.t(), b.t())},
        "dh = dy B": {"dy B": lambda: torch.mm(dy, b), "B^T dy^T (dh^T)": lambda: torch.mm(b.t(), dy.t())},
        "dB = dy^T h": {"dy^T h": lambda: torch.mm(dy.t(), h), "dy^T (h^T)^T": lambda: torch.mm(dy.t(), h_t.t()),
                        "h^T dy (dB^T)": lambda: torch.mm(h.t(), dy), "(h^T) dy (dB^T)": lambda: torch.mm(h_t, dy)},
        "dA = dh^T x": {"dh^T x": lambda: torch.mm(dh.t(), x), "(dh^T) x": lambda: torch.mm(dh_t, x),
                        "x^T dh (dA^T)": lambda: torch.mm(x.t(), dh)},
        "dx = dh A": {"dh A": lambda: torch.mm(dh, a), "(dh^T)^T A": lambda: torch.mm(dh_t.t(), a)},
        "y = x W^T": {"mm": lambda: torch.mm(x, w.t()), "addmm_ beta=1 into y": lambda: y.addmm_(x, w.t())},
    }
    wide = {"h = x A^T": d_in, "z = h B^T": d_out, "dh = dy B": d_out, "dB = dy^T h": d_out, "dA = dh^T x": d_in,
            "dx = dh A": d_in, "y = x W^T": 0}
    rows = []
    for op, layouts in cases.items():
        for layout, fn in layouts.items():
            ms = gpu_ms(fn)
            moved = TOKENS * wide[op] * 2  # bytes of the one d-wide operand each skinny GEMM reads or writes
            rows.append({"d_in": d_in, "d_out": d_out, "op": op, "layout": layout, "us": ms * 1e3,
                         "tb_per_s": moved / ms / 1e9 if moved else None})
            bw = f"{moved / ms / 1e9:5.2f} TB/s" if moved else ""
            print(f"  {d_in:>5}->{d_out:<5} {op:<12} {layout:<22} {ms * 1e3:8.1f} us {bw}", flush=True)
    return rows


def inductor_rows() -> list[dict]:
    """The q/k/v/o shape's read-bound GEMMs as torch.compile's max-autotune builds them (it times
    cuBLAS against its Triton templates and keeps the faster): what a generated kernel could gain."""
    t = random_bf16
    x, dy, a, b, h = t(TOKENS, 4096), t(TOKENS, 4096), t(RANK, 4096), t(4096, RANK), t(TOKENS, RANK)
    mm = torch.compile(torch.mm, mode="max-autotune-no-cudagraphs", dynamic=False)
    rows = []
    for op, args in {"h = x A^T": (x, a.t()), "dh = dy B": (dy, b), "dB = dy^T h": (dy.t(), h),
                     "dA = dh^T x": (h.t(), x)}.items():
        ms = gpu_ms(lambda: mm(*args))
        rows.append({"op": op, "us": ms * 1e3, "tb_per_s": TOKENS * 4096 * 2 / ms / 1e9})
        print(f"  inductor 4096->4096 {op:<12} {ms * 1e3:8.1f} us {rows[-1]['tb_per_s']:5.2f} TB/s", flush=True)
    return rows


def adamw_rows(layers: int = 32) -> list[dict]:
    """One AdamW step over float32 LoRA parameters of the 7B shape (q, k, v, o, up, down; every layer
    its own LoRA), foreach against fused."""
    shapes = [(RANK, 4096)] * 5 + [(RANK, 11008)] + [(4096, RANK)] * 5 + [(11008, RANK)]  # A's, then B's
    params = [torch.zeros(s, device="cuda", requires_grad=True) for s in shapes * layers]
    for p in params:
        p.grad = torch.randn_like(p)
    rows = []
    for kind in ("foreach", "fused"):
        opt = torch.optim.AdamW(params, lr=1e-4, **{kind: True})
        ms = gpu_ms(opt.step, reps=5, calls=4)
        rows.append({"optimizer": kind, "parameters": sum(p.numel() for p in params), "ms": ms})
        print(f"  AdamW {kind:<8} {ms:6.2f} ms for {rows[-1]['parameters']:,} parameters", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inductor", action="store_true", help="also time torch.compile max-autotune GEMMs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": TOKENS, "r": RANK,
              "gemms": [row for d_in, d_out in SHAPES for row in gemm_rows(d_in, d_out)], "adamw": adamw_rows()}
    report["inductor"] = inductor_rows() if args.inductor else None
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
