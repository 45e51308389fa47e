"""When Liger's kernels go on a model and when not, and what the run records about it. Applying them
needs CUDA and Triton; that path is checked against the plain model on a GPU by
``benchmarks/check_liger.py`` (loss and LoRA gradients)."""

import pytest
import torch
from conftest import tiny_llama

from loradrop import LoraDropConfig, apply_liger
from loradrop.sites import add_lora


def _patched(model) -> list[str]:
    """Modules whose forward was rebound on the instance (how Liger patches a loaded model)."""
    return [name for name, module in model.named_modules() if "forward" in vars(module)]


def test_nothing_is_applied_on_the_cpu():
    model = tiny_llama(layers=2)
    x = torch.randint(0, 64, (2, 5))
    before = model(input_ids=x, labels=x).loss
    record = apply_liger(model)
    assert record == {"applied": [], "reason": "the model is on cpu: Liger's kernels run on CUDA only"}
    assert _patched(model) == []
    torch.testing.assert_close(model(input_ids=x, labels=x).loss, before, rtol=0, atol=0)


def test_turned_off_says_so():
    assert apply_liger(tiny_llama(layers=1), enabled=False) == {"applied": [], "reason": "turned off (--no-liger)"}


def test_a_peft_model_is_refused_with_the_fix():
    model = add_lora(tiny_llama(layers=1), LoraDropConfig(r=2))
    with pytest.raises(ValueError, match="before PEFT wraps it"):
        apply_liger(model)
