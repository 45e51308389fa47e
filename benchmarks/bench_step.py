"""Training-step speed and memory of loradrop against PEFT, on a Llama-shaped model, in one run.

Every variant trains the same random bf16 base on the same batch: median step time (forward,
backward, AdamW) over timed steps after warm-up, peak GPU memory, tokens/s, and the ratio to the
floor -- the frozen base's forward plus the input-gradient backward that every LoRA method must do.
Also the compact adapter's bytes against a PEFT adapter of the same config.

Rows named ``liger ...`` run with liger-kernel's RoPE, RMSNorm, SwiGLU and fused linear cross-entropy
on the base (``loradrop.apply_liger``), after every other row, since Liger patches the base for good.
``--qlora`` runs the rows on a bitsandbytes 4-bit NF4 base instead; ``--checkpointing`` turns on
gradient checkpointing (non-reentrant) for every row, as for long context.

    python benchmarks/bench_step.py --shape 7b --out results.json
    python benchmarks/bench_step.py --shape 7b --batch 1 --seq 8192 --checkpointing --out long.json
    python benchmarks/bench_step.py --shape 7b --qlora --out qlora.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import loradrop  # noqa: E402
from loradrop import (  # noqa: E402
    LoraDropConfig, Plan, apply_plan, disable_fast_path, enable_fast_path, find_sites,
)
from loradrop import layer as ld_layer  # noqa: E402
from loradrop.sites import site_layers  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),  # Llama-3-8B: GQA, 128 k vocabulary
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def build_base(shape: str, qlora: bool = False, checkpointing: bool = False) -> LlamaForCausalLM:
    """A random bf16 Llama of ``shape`` on the GPU; with ``qlora`` its linear layers are bitsandbytes
    4-bit NF4 (bf16 compute), loaded as users load them: saved, then read with a quantization config."""
    config = LlamaConfig(max_position_embeddings=8192, **SHAPES[shape])
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    if qlora:
        from transformers import BitsAndBytesConfig

        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            del model
            torch.cuda.empty_cache()
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.bfloat16)
            model = LlamaForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map={"": 0})
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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


@dataclass(frozen=True)
class Variant:
    """One row of the table: what trains, in which precision, on which forward."""

    name: str
    kind: str = "loradrop"  # floor | peft | loradrop
    adapters: str = "fp32"  # fp32 masters under bf16 autocast (the Trainer setting) | bf16 without autocast
    plan: str = "full"  # full: every site its own LoRA | half: LoRA-drop, every other layer retained
    rank_dropout: float = 0.0
    lora_dropout: float = 0.0
    fast: bool = False
    probe: bool = False
    liger: bool = False  # the base with Liger's kernels


VARIANTS = [
    Variant("floor", kind="floor"),
    Variant("peft-fp32-adapters+autocast", kind="peft"),
    Variant("peft-bf16-adapters", kind="peft", adapters="bf16"),
    Variant("peft-fp32+autocast+lora_dropout0.05", kind="peft", lora_dropout=0.05),
    Variant("loradrop-lora-drop+rank-dropout0.5 (PEFT forward)", plan="half", rank_dropout=0.5),
    Variant("fast lora fp32+autocast", fast=True),
    Variant("fast lora bf16", adapters="bf16", fast=True),
    Variant("fast lora-drop fp32+autocast", plan="half", fast=True),
    Variant("fast lora-drop+rank-dropout0.5 fp32+autocast", plan="half", rank_dropout=0.5, fast=True),
    Variant("fast lora-drop+rank-dropout0.5 bf16", adapters="bf16", plan="half", rank_dropout=0.5, fast=True),
    Variant("fast lora fp32+autocast+lora_dropout0.05", lora_dropout=0.05, fast=True),
    Variant("fast lora fp32+autocast+probe-hooks", fast=True, probe=True),
    Variant("liger floor", kind="floor", liger=True),
    Variant("liger peft-bf16-adapters", kind="peft", adapters="bf16", liger=True),
    Variant("liger fast lora-drop+rank-dropout0.5 bf16", adapters="bf16", plan="half", rank_dropout=0.5, fast=True,
            liger=True),
    Variant("liger fast lora-drop+rank-dropout0.5 fp32+autocast", plan="half", rank_dropout=0.5, fast=True,
            liger=True),
]


def build(base, v: Variant, r: int, batch: dict, optimizer: str = "fused"):
    """The model of variant ``v`` on ``base``, in training mode, and one training step of it
    (forward, backward, AdamW on the trainable parameters; the floor has no optimizer). ``optimizer``
    is AdamW's implementation, fused (the Trainer's default, ``adamw_torch_fused``) or foreach."""
    model = _model(base, v, r)
    adamw = None
    if v.kind != "floor":
        adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, **{optimizer: True})
    model.train()
    return model, make_step(model, batch, v.kind != "floor" and v.adapters == "fp32", adamw)


def teardown(base, v: Variant, model) -> None:
    """Removes every trace of variant ``v`` from ``base`` (drop the variant's step first, which holds
    its optimizer)."""
    if v.kind == "floor":
        base.disable_input_require_grads()
    else:
        loradrop.remove_rank_dropout(model)
        model.unload()
    base.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()


def _model(base, v: Variant, r: int):
    if v.kind == "floor":
        base.enable_input_require_grads()
        return base
    cfg = lora_config(r)
    cfg.lora_dropout = v.lora_dropout
    model = get_peft_model(base, cfg, autocast_adapter_dtype=v.adapters == "fp32")
    if v.kind == "peft":
        return model
    ld_cfg = LoraDropConfig(target_modules=TARGETS, r=r, lora_alpha=2 * r, seed=0, rank_dropout=v.rank_dropout,
                            fast_path=v.fast)
    return apply_plan(model, half_plan(model) if v.plan == "half" else full_plan(model), ld_cfg)


def run_variant(base, v: Variant, batch, r, warmup, steps, results, optimizer: str):
    """Builds one variant on ``base``, times it, then removes every trace of it from ``base``."""
    model, step = build(base, v, r, batch, optimizer)
    probe = loradrop.ImportanceProbe(model) if v.probe else contextlib.nullcontext()
    with probe:  # the probe's hooks stay on for all timed steps, as during a probe run
        ms, gib = time_steps(step, warmup, steps)
    tokens = batch["input_ids"].numel()
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    results.append({"variant": v.name, **asdict(v), "ms": ms, "peak_gib": gib, "tokens_per_s": tokens / ms * 1e3,
                    "lora_parameters": lora})
    print(f"  {v.name:<48} {ms:8.1f} ms {gib:7.2f} GiB {tokens / ms * 1e3:10.0f} tok/s  lora {lora:,}", flush=True)
    del step
    teardown(base, v, model)


def diagnose(layer, x) -> dict:
    base, a, b = layer.base_layer, layer.lora_A["default"], layer.lora_B["default"]
    return {"plain": [ld_layer._plain_weight(m) is not None for m in (base, a, b)], "global_hooks": ld_layer._global_hooks(),
            "hooks": [dict(m._forward_hooks) for m in (base, a, b)], "active": layer.active_adapters,
            "merged": layer.merged, "disabled": layer.disable_adapters, "dtypes": [x.dtype, base.weight.dtype,
            a.weight.dtype, b.weight.dtype], "class": type(layer).__name__, "supported": ld_layer.FAST_PATH_SUPPORTED}


class _GivenDropout(torch.nn.Module):
    """Dropout with a given keep-mask: PEFT's path with the fast path's draw."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep.view(x.shape).to(x.dtype) / (1 - self.p)


def check_numbers(shape: str, tokens: int, r: int) -> list[dict]:
    """The fast path against PEFT's forward on the GPU, per projection shape of ``shape``, precision
    and lora_dropout: norm-wise relative error of the output and of every gradient, on fresh random
    inputs. Both paths draw the dropout from one seed; with float32 adapters PEFT draws on a float32
    copy of x, which the fused kernel maps to other random numbers, so there PEFT gets the fast path's
    mask."""
    hidden, inter = SHAPES[shape]["hidden_size"], SHAPES[shape]["intermediate_size"]
    rows = []
    shapes = ((hidden, hidden), (hidden, inter), (inter, hidden))
    for (d_in, d_out), adapters, dropout in itertools.product(shapes, ("fp32", "bf16"), (0.0, 0.05)):
        torch.manual_seed(d_in + d_out)
        net = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=False)).to("cuda", torch.bfloat16)
        model = get_peft_model(net, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], lora_dropout=dropout),
                               autocast_adapter_dtype=adapters == "fp32")
        layer = model.base_model.model[0]
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
        x = torch.randn(tokens, d_in, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(tokens, d_out, device="cuda", dtype=torch.bfloat16)
        outs, own_draw = [], None
        for fast in (True, False):
            (enable_fast_path if fast else disable_fast_path)(model)
            xi = x.clone().requires_grad_()
            torch.manual_seed(0)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=adapters == "fp32"):
                if fast and layer._fast_spec(x) is None:
                    raise RuntimeError(f"the fast path does not apply to the checked layer: {diagnose(layer, x)}")
                if own_draw is not None:  # PEFT drops a float32 copy of x: a different draw, so give it ours
                    layer.lora_dropout["default"] = _GivenDropout(own_draw, dropout)
                y = layer(xi)
            if fast and dropout and adapters == "fp32":
                own_draw = y.grad_fn.next_functions[0][0].saved_tensors[-1]  # the fast path's dropout mask
            y.backward(dy)
            outs.append({"out": y.detach(), "x": xi.grad} |
                        {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None})
            layer.zero_grad(set_to_none=True)
        errors = {k: ((outs[0][k].double() - outs[1][k].double()).norm() / outs[1][k].double().norm()).item()
                  for k in outs[0]}
        rows.append({"d_in": d_in, "d_out": d_out, "adapters": adapters, "lora_dropout": dropout, "rel_err": errors})
        print(f"  check {d_in}->{d_out} {adapters} lora_dropout {dropout}: max rel err {max(errors.values()):.2e}",
              flush=True)
    return rows


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



def run_paired(base, variants: list[Variant], batch, r: int, steps: int, rounds: int, optimizer: str) -> list[dict]:
    """For host-bound shapes, where a machine's drift is as large as the differences: every variant
    on its own copy of the base, all built first, then timed in alternating rounds (``steps`` steps
    each); a variant's time is its median and its minimum over rounds. No memory figures (all models
    are resident)."""
    timed = [(v, build(copy.deepcopy(base), v, r, batch, optimizer)[1]) for v in variants]
    each: dict[str, list[float]] = {v.name: [] for v in variants}
    for _ in range(rounds):
        for v, step in timed:
            each[v.name].append(time_steps(step, 1, steps)[0])
    floor, floor_min = statistics.median(each[variants[0].name]), min(each[variants[0].name])
    rows = [{"variant": v.name, "ms": statistics.median(each[v.name]), "ms_min": min(each[v.name]),
             "ms_each": each[v.name]} for v, _ in timed]
    for row in rows:  # the minimum is the robust figure where host interference makes rounds bimodal
        row["x_floor"], row["x_floor_min"] = row["ms"] / floor, row["ms_min"] / floor_min
        print(f"  paired {row['variant']:<48} median {row['ms']:7.1f} ms {row['x_floor']:6.3f} x floor   "
              f"min {row['ms_min']:7.1f} ms {row['x_floor_min']:6.3f} x", flush=True)
    return rows


def summarise(runs: list[dict]) -> list[dict]:
    """One row per variant: the median over repeats of its ms and peak memory, and its ratio to the floor's."""
    rows = []
    for name in dict.fromkeys(run["variant"] for run in runs):
        mine = [run for run in runs if run["variant"] == name]
        ms = statistics.median(run["ms"] for run in mine)
        rows.append({**mine[0], "ms": ms, "ms_each": [run["ms"] for run in mine], "tokens_per_s": mine[0]["tokens_per_s"]
                     * mine[0]["ms"] / ms, "peak_gib": max(run["peak_gib"] for run in mine)})
    liger_floor = next((row["ms"] for row in rows if row["kind"] == "floor" and row["liger"]), None)
    for row in rows:
        row.pop("repeat", None)
        row["x_floor"] = row["ms"] / rows[0]["ms"]  # the plain HF floor, the first row
        if row["liger"] and liger_floor:
            row["x_liger_floor"] = row["ms"] / liger_floor
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, nargs="+", default=["7b", "1b"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1, help="passes over all variants; rows are their medians")
    parser.add_argument("--paired", type=int, metavar="ROUNDS",
                        help="time all variants resident, in this many alternating rounds (host-bound shapes)")
    parser.add_argument("--only", nargs="+", help="run only the variants whose names contain one of these words")
    parser.add_argument("--optimizer", choices=["fused", "foreach"], default="fused",
                        help="AdamW's implementation for every trained variant (fused: the Trainer's default)")
    parser.add_argument("--qlora", action="store_true", help="a bitsandbytes 4-bit NF4 base")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (use_reentrant=False)")
    parser.add_argument("--skip-checks", action="store_true", help="no numerics check and no adapter bytes")
    parser.add_argument("--liger-rows", choices=["yes", "no", "only"], default="yes",
                        help="the rows with Liger's kernels: also, none, or only them (and the plain floor)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "optimizer": args.optimizer,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "peft": peft.__version__, "loradrop": loradrop.__version__,
                           "python": platform.python_version()},
              "batch": args.batch, "seq": args.seq, "r": args.r, "qlora": args.qlora,
              "checkpointing": args.checkpointing, "shapes": {}}
    for shape in args.shape:
        print(f"shape {shape}: {SHAPES[shape]}", flush=True)
        base = build_base(shape, args.qlora, args.checkpointing)
        torch.manual_seed(0)
        ids = torch.randint(0, SHAPES[shape]["vocab_size"], (args.batch, args.seq), device="cuda")
        batch = {"input_ids": ids, "labels": ids}
        selected = [v for v in VARIANTS if args.only is None or v.kind == "floor" or any(w in v.name for w in args.only)]
        selected = [v for v in selected if {"yes": True, "no": not v.liger, "only": v.liger or v.name == "floor"}
                    [args.liger_rows]]
        selected.sort(key=lambda v: v.liger)  # Liger patches the base for good: its rows come last
        if args.paired:
            selected = [v for v in selected if not v.probe and not v.liger]  # these are timed sequentially only
            report["shapes"][shape] = {"config": SHAPES[shape], "paired_rounds": args.paired,
                                       "paired": run_paired(base, selected, batch, args.r, args.steps, args.paired,
                                                                   args.optimizer)}
            del base
            gc.collect()
            torch.cuda.empty_cache()
            args.out.write_text(json.dumps(report, indent=2))
            continue
        runs: list[dict] = []
        liger = None
        for with_liger in (False, True):
            group = [v for v in selected if v.liger == with_liger]
            if with_liger and group:
                liger = loradrop.apply_liger(base)
                print(f"  Liger: {liger}", flush=True)
            for repeat in range(args.repeat):  # whole passes over the variants, so drift hits all alike
                for v in group:
                    run_variant(base, v, batch, args.r, args.warmup, args.steps, runs, args.optimizer)
                    runs[-1]["repeat"] = repeat
        report["shapes"][shape] = {"config": SHAPES[shape], "runs": runs, "variants": summarise(runs), "liger": liger}
        if not args.skip_checks:
            report["shapes"][shape].update(adapter=adapter_bytes(base, args.r),
                                           fast_path_check=check_numbers(shape, args.batch * args.seq, args.r))
        del base
        gc.collect()
        torch.cuda.empty_cache()
        args.out.write_text(json.dumps(report, indent=2))
    print()
    for shape, data in report["shapes"].items():
        if "variants" not in data:
            continue
        print(f"{shape}: {'variant':<48} {'ms':>8} {'x floor':>8} {'GiB':>7} {'tok/s':>9}")
        for row in data["variants"]:
            liger = f"{row['x_liger_floor']:8.3f} x Liger floor" if "x_liger_floor" in row else ""
            print(f"    {row['variant']:<48} {row['ms']:8.1f} {row['x_floor']:8.3f} {row['peak_gib']:7.2f} "
                  f"{row['tokens_per_s']:9.0f} {liger}")
        if "adapter" in data:
            a = data["adapter"]
            print(f"    adapter: compact {a['compact_bytes']:,} B / PEFT {a['peft_bytes']:,} B = {a['ratio']:.3f}")


if __name__ == "__main__":
    main()
