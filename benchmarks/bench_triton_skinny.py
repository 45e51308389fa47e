"""Could hand-written Triton kernels move a LoRA site's skinny GEMMs closer to the card's bandwidth
than cuBLAS? The three patterns of the fast path, each timed with ``triton.testing.do_bench`` over a
grid of tile configs, against cuBLAS on the same tensors:

* read  ``h = x A^T`` (and ``dh = dy B``): tokens x d read, tokens x r written;
* reduce ``dB = dy^T h`` (and ``dA = dh^T x``): the contraction runs over tokens;
* write ``z = h B^T`` (and ``dx = dh A``): tokens x d written from r-wide operands.

    python benchmarks/bench_triton_skinny.py --out results.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from bench_lora_gemms import RANK, TOKENS, random_bf16



@triton.jit
def _read_kernel(x, a, out, K, sxm, sxk, sak, san, BM: tl.constexpr, BK: tl.constexpr, R: tl.constexpr):
    """out[BM rows, R] = x[rows, :] @ a[:, R]: each program streams BM full rows of x."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk, rn = tl.arange(0, BK), tl.arange(0, R)
    acc = tl.zeros((BM, R), tl.float32)
    for k in range(0, K, BK):
        xt = tl.load(x + rm[:, None] * sxm + (k + rk)[None, :] * sxk)
        at = tl.load(a + (k + rk)[:, None] * sak + rn[None, :] * san)
        acc += tl.dot(xt, at)
    tl.store(out + rm[:, None] * R + rn[None, :], acc.to(tl.bfloat16))


@triton.jit
def _reduce_kernel(dy, h, out, T, sdt, sdm, sht, shr, BM: tl.constexpr, BT: tl.constexpr, R: tl.constexpr):
    """out[BM, R] = dy[:, BM cols]^T @ h[:, R], the contraction over all T tokens."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rt, rn = tl.arange(0, BT), tl.arange(0, R)
    acc = tl.zeros((BM, R), tl.float32)
    for t in range(0, T, BT):
        dyt = tl.load(dy + (t + rt)[:, None] * sdt + rm[None, :] * sdm)  # BT x BM
        ht = tl.load(h + (t + rt)[:, None] * sht + rn[None, :] * shr)  # BT x R
        acc += tl.dot(tl.trans(dyt), ht)
    tl.store(out + rm[:, None] * R + rn[None, :], acc)


@triton.jit
def _write_kernel(h, b, out, N, shm, shr, sbr, sbn, BM: tl.constexpr, BN: tl.constexpr, R: tl.constexpr):
    """out[BM, BN] = h[BM, R] @ b[R, BN]: one dot per output tile."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rr = tl.arange(0, R)
    ht = tl.load(h + rm[:, None] * shm + rr[None, :] * shr)
    bt = tl.load(b + rr[:, None] * sbr + rn[None, :] * sbn)
    tl.store(out + rm[:, None] * N + rn[None, :], tl.dot(ht, bt).to(tl.bfloat16))


def best(configs, launch, reference) -> dict:
    rows = []
    for cfg in configs:
        try:
            out = launch(**cfg)
            torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-1)
            rows.append({**cfg, "us": do_bench(lambda: launch(**cfg)) * 1e3})
        except Exception as exc:  # a config that does not compile or fit: skip it, say why
            rows.append({**cfg, "error": str(exc)[:120]})
    ok = [r for r in rows if "us" in r]
    return {"best": min(ok, key=lambda r: r["us"]) if ok else None, "tried": rows}


def run(d: int) -> list[dict]:
    t = random_bf16
    x, a, dy, h, b = t(TOKENS, d), t(RANK, d), t(TOKENS, d), t(TOKENS, RANK), t(d, RANK)
    moved = TOKENS * d * 2
    report = []
    grid = dict(num_warps=[4, 8], num_stages=[3, 4])

    def configs(**sizes):
        keys = list(sizes) + list(grid)
        return [dict(zip(keys, v)) for v in itertools.product(*sizes.values(), *grid.values())]

    out_r = torch.empty(TOKENS, RANK, device="cuda", dtype=torch.bfloat16)

    def read(BM, BK, num_warps, num_stages):
        _read_kernel[(TOKENS // BM,)](x, a, out_r, d, x.stride(0), x.stride(1), a.stride(1), a.stride(0), BM=BM, BK=BK,
                                     R=RANK, num_warps=num_warps, num_stages=num_stages)
        return out_r

    out_d = torch.empty(d, RANK, device="cuda", dtype=torch.float32)

    def reduce(BM, BT, num_warps, num_stages):
        _reduce_kernel[(d // BM,)](dy, h, out_d, TOKENS, dy.stride(0), dy.stride(1), h.stride(0), h.stride(1), BM=BM,
                                   BT=BT, R=RANK, num_warps=num_warps, num_stages=num_stages)
        return out_d

    out_w = torch.empty(TOKENS, d, device="cuda", dtype=torch.bfloat16)

    def write(BM, BN, num_warps, num_stages):
        _write_kernel[(TOKENS // BM, d // BN)](h, b, out_w, d, h.stride(0), h.stride(1), b.stride(1), b.stride(0), BM=BM,
                                               BN=BN, R=RANK, num_warps=num_warps, num_stages=num_stages)
        return out_w

    cases = [("read  h = x A^T", read, configs(BM=[16, 32, 64], BK=[64, 128, 256]), x @ a.t(), lambda: x @ a.t()),
             ("reduce dB = dy^T h", reduce, configs(BM=[16, 32, 64], BT=[64, 128, 256]), (dy.t() @ h).float(),
              lambda: dy.t() @ h),
             ("write z = h B^T", write, configs(BM=[64, 128], BN=[64, 128, 256]), h @ b.t(), lambda: h @ b.t())]
    for name, launch, cfgs, reference, cublas in cases:
        found = best(cfgs, launch, reference)
        cublas_us = do_bench(cublas) * 1e3
        row = {"d": d, "op": name, "cublas_us": cublas_us, "cublas_tb_per_s": moved / cublas_us / 1e6, **found}
        if found["best"]:
            row["triton_tb_per_s"] = moved / found["best"]["us"] / 1e6
        report.append(row)
        b_us = found["best"]["us"] if found["best"] else float("nan")
        print(f"  d={d:>5} {name:<20} cuBLAS {cublas_us:6.1f} us ({moved / cublas_us / 1e6:4.2f} TB/s)   "
              f"Triton best {b_us:6.1f} us ({moved / b_us / 1e6:4.2f} TB/s) {found['best']}", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = {"gpu": torch.cuda.get_device_name(), "triton": triton.__version__, "tokens": TOKENS, "r": RANK,
              "rows": [row for d in (4096, 11008) for row in run(d)]}
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
