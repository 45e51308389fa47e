"""Do Liger's kernels change what LoRA-drop + DropLoRA trains? One training step's loss and every
LoRA gradient, on the GPU, with and without ``loradrop.apply_liger``, measured against bf16's own noise.

A random Llama (bf16 base, LoRA-drop plan with every other layer retained, B initialised non-zero so
that every gradient is) is run three ways: float32 without Liger (the reference), bf16 without Liger,
bf16 with Liger. Without the rank mask, bf16's distance from the reference is the noise floor, and
Liger's distance from the reference must stay within twice it. With the rank mask (p = 0.5; the two
bf16 runs draw the same masks from one seed), Liger against plain bf16 must also stay within twice
that floor. Writes a JSON record and exits 1 when a check fails.

    python benchmarks/check_liger.py --out liger_check.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import loradrop  # noqa: E402
from loradrop import LoraDropConfig, apply_plan  # noqa: E402
from bench_step import TARGETS, half_plan, lora_config  # noqa: E402

R = 16


def one_step(base: LlamaForCausalLM, batch: dict, rank_dropout: float, liger: bool = False) -> dict[str, torch.Tensor]:
    """Loss and LoRA gradients (float64, by parameter name) of one forward + backward of a copy of
    ``base``, with Liger's kernels applied to the copy when ``liger``."""
    base = copy.deepcopy(base)
    if liger:
        applied = loradrop.apply_liger(base)
        if not applied["applied"]:
            raise SystemExit(f"Liger was not applied: {applied['reason']}")
    model = get_peft_model(base, lora_config(R), autocast_adapter_dtype=False)
    cfg = LoraDropConfig(target_modules=TARGETS, r=R, lora_alpha=2 * R, seed=0, rank_dropout=rank_dropout)
    model = apply_plan(model, half_plan(model), cfg)
    generator = torch.Generator(device="cuda").manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, device="cuda", generator=generator) * 0.02)
    model.train()
    torch.manual_seed(2)  # the same rank masks in every run of one dtype
    loss = model(**batch).loss
    loss.backward()
    out = {"loss": loss.detach().double()}
    out |= {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    return out


def distance(a: dict, b: dict) -> dict[str, float]:
    """Relative error of the loss and the worst and median relative error over the LoRA gradients."""
    grads = sorted(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a if k != "loss")
    return {"loss": abs((a["loss"] - b["loss"]) / b["loss"]).item(), "grad_max": grads[-1],
            "grad_median": grads[len(grads) // 2], "tensors": len(grads)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=args.layers,
                         num_attention_heads=16, num_key_value_heads=4, vocab_size=32000)
    with torch.device("cuda"):
        fp32 = LlamaForCausalLM(config)
    fp32.requires_grad_(False)
    ids = torch.randint(0, 32000, (4, 512), device="cuda")
    batch = {"input_ids": ids, "labels": ids}
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)

    # Liger also swaps the architecture's module-level RoPE function for good: plain runs come first
    reference = one_step(fp32, batch, 0.0)
    plain, masked_plain = one_step(bf16, batch, 0.0), one_step(bf16, batch, 0.5)
    noise = distance(plain, reference)
    liger_err = distance(one_step(bf16, batch, 0.0, liger=True), reference)
    masked = distance(one_step(bf16, batch, 0.5, liger=True), masked_plain)

    def within(err: dict) -> bool:
        return all(err[k] <= 2 * noise[k] + 1e-6 for k in ("loss", "grad_max", "grad_median"))

    record = {"bf16_vs_fp32": noise, "liger_bf16_vs_fp32": liger_err,
              "liger_vs_plain_bf16_with_rank_mask": masked,
              "passed": {"liger_vs_fp32": within(liger_err), "with_rank_mask": within(masked)},
              "gpu": torch.cuda.get_device_name(), "versions": {"torch": torch.__version__}}
    args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    if not all(record["passed"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
