import contextlib
import copy

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from peft.tuners import lora

from conftest import cls_dataset, padded_batch, randomize_lora, tiny_bert, tiny_gpt2, tiny_llama
from loradrop import (
    ImportanceProbe,
    LoraDropConfig,
    LoraDropLinear,
    Plan,
    apply_plan,
    disable_fast_path,
    enable_fast_path,
    evaluate_importance,
    fast_path_enabled,
    load_adapter,
    save_adapter,
)
from loradrop.layer import _LoraLinearFunction
from loradrop.sites import lora_layers

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


@pytest.fixture
def fast_calls(monkeypatch):
    """Counts the calls that took the fast path."""
    calls = []
    apply = _LoraLinearFunction.apply

    def counted(*args):
        calls.append(args[0].shape)
        return apply(*args)

    monkeypatch.setattr(_LoraLinearFunction, "apply", counted)
    return calls


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of ``a`` against the reference ``b``."""
    diff, ref = (a.double() - b.double()).norm().item(), b.double().norm().item()
    return diff / ref if ref else diff


class Net(nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(24, 40, bias=bias)


def lora_linear(base_dtype, adapter_dtype, bias=True, train_base=False, seed=0, lora_dropout=0.0):
    torch.manual_seed(seed)
    model = get_peft_model(Net(bias).to(base_dtype), LoraConfig(r=6, lora_alpha=9, target_modules=["proj"],
                                                                lora_dropout=lora_dropout))
    layer = model.base_model.model.proj
    randomize_lora(model, seed)
    for p in layer.lora_A.parameters():
        p.data = p.data.to(adapter_dtype)
    for p in layer.lora_B.parameters():
        p.data = p.data.to(adapter_dtype)
    layer.base_layer.requires_grad_(train_base)
    return layer


def forward_and_grads(layer, x, autocast):
    """Output and every gradient (input, LoRA A and B, trainable base weights) of a sum-of-squares loss;
    the same seed for every call, so both paths draw the same dropout."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    out.float().square().sum().backward()
    grads = {"x": x.grad} | {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


CASES = {  # base dtype, adapter dtype, autocast, tolerance
    "float32": (torch.float32, torch.float32, False, 1e-5),
    "bf16": (torch.bfloat16, torch.bfloat16, False, 1e-2),
    "bf16-base-fp32-adapters-autocast": (torch.bfloat16, torch.float32, True, 1e-2),
    "fp32-base-fp32-adapters-autocast": (torch.float32, torch.float32, True, 1e-2),
}


@pytest.mark.parametrize("lora_dropout", [0.0, 0.3], ids=["", "lora_dropout"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [(3, 5, 24), (7, 24), (24,)])
def test_layer_matches_peft_on_fresh_inputs(case, shape, lora_dropout, fast_calls):
    base_dtype, adapter_dtype, autocast, tol = CASES[case]
    layer = lora_linear(base_dtype, adapter_dtype, lora_dropout=lora_dropout)
    for seed in range(3):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(base_dtype)
        disable_fast_path(layer)
        ref_out, ref_grads = forward_and_grads(layer, x, autocast)
        enable_fast_path(layer)
        out, grads = forward_and_grads(layer, x, autocast)
        assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
        assert rel(out, ref_out) <= tol
        assert grads.keys() == ref_grads.keys() == {"x", "lora_A.default.weight", "lora_B.default.weight"}
        for name in grads:
            assert grads[name].dtype == ref_grads[name].dtype, name
            assert rel(grads[name], ref_grads[name]) <= tol, name
    assert len(fast_calls) == 3


@pytest.mark.parametrize("lora_dropout", [0.0, 0.3], ids=["", "lora_dropout"])
def test_layer_matches_the_formula_and_trains_a_trainable_base(lora_dropout, fast_calls):
    layer = enable_fast_path(lora_linear(torch.float64, torch.float64, train_base=True, lora_dropout=lora_dropout))
    x = torch.randn(4, 5, 24, dtype=torch.float64, requires_grad=True)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    w, bias, s = layer.base_layer.weight, layer.base_layer.bias, layer.scaling["default"]
    torch.manual_seed(0)  # the dropout noise as torch's CPU dropout draws it
    noise = torch.empty_like(x).bernoulli_(1 - lora_dropout).div_(1 - lora_dropout)
    torch.manual_seed(0)
    assert torch.allclose(layer(x), x @ w.T + bias + s * ((x * noise) @ a.T) @ b.T)

    def seeded(x, w, bias, a, b):  # gradcheck calls the layer many times: the same noise each time
        torch.manual_seed(0)
        return layer(x)

    assert torch.autograd.gradcheck(seeded, (x, w, bias, a, b))
    assert len(fast_calls) >= 1


def peft_llama(**lora):
    model = get_peft_model(tiny_llama(layers=2), LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, **lora))
    randomize_lora(model)
    return model


def loss_and_grads(model, seed=0, batch=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**(batch or padded_batch(with_labels="lm")))
    if out.loss.requires_grad:  # not with merged adapters
        out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(a, b, tol):
    (logits_a, grads_a), (logits_b, grads_b) = a, b
    assert rel(logits_a, logits_b) <= tol
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert rel(grads_a[name], grads_b[name]) <= tol, name


@pytest.mark.parametrize("probe", [False, True], ids=["", "probe-hooks-on"])
@pytest.mark.parametrize("granularity", ["token", "sample", "step"])
def test_lora_drop_with_rank_dropout_matches_peft_path(granularity, probe, fast_calls):
    cfg = LoraDropConfig(target_modules=LLAMA_TARGETS, r=4, rank_dropout=0.5, rank_dropout_granularity=granularity,
                         lora_dropout=0.1, fast_path=False)  # both draws, in PEFT's order
    plan = Plan(layers={t: [0, 1, 2] for t in LLAMA_TARGETS}, retained={t: [1] for t in LLAMA_TARGETS})
    model = apply_plan(tiny_llama(layers=3), plan, cfg)
    randomize_lora(model)
    model.train()
    assert not fast_path_enabled(model)
    hooks = (lambda: ImportanceProbe(model)) if probe else contextlib.nullcontext  # the probe sees per-example shapes
    with hooks() as reference_probe:
        reference = loss_and_grads(model)
    enable_fast_path(model)
    with hooks() as fast_probe:
        assert_same_step(loss_and_grads(model), reference, 1e-5)
    if probe:
        want, got = reference_probe.raw_scores(), fast_probe.raw_scores()
        assert all(got[site] == pytest.approx(want[site], rel=1e-5) for site in want)
    assert len(fast_calls) == 18  # 6 types x 3 layers, shared sites included
    other = loss_and_grads(model, seed=1)  # another seed draws other masks
    assert rel(other[0], reference[0]) > 1e-4


def test_apply_plan_turns_it_on_and_the_config_can_turn_it_off():
    plan = Plan(layers={"query": [0, 1, 2, 3]}, retained={"query": [0]})
    assert fast_path_enabled(apply_plan(tiny_bert(), plan, LoraDropConfig(target_modules=["query"])))
    assert not fast_path_enabled(apply_plan(tiny_bert(), plan, LoraDropConfig(target_modules=["query"], fast_path=False)))
    with pytest.raises(ValueError, match="fast_path"):
        LoraDropConfig(target_modules=["query"], fast_path="yes")


def test_gradient_checkpointing_replays_masks_on_the_fast_path(fast_calls):
    cfg = LoraDropConfig(target_modules=LLAMA_TARGETS, r=4, rank_dropout=0.5, lora_dropout=0.1)
    plan = Plan(layers={t: [0, 1] for t in LLAMA_TARGETS}, retained={t: [0] for t in LLAMA_TARGETS})
    plain = apply_plan(tiny_llama(layers=2), plan, cfg)
    randomize_lora(plain)
    ckpt = apply_plan(tiny_llama(layers=2), plan, cfg)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain.train(), ckpt.train()
    reference = loss_and_grads(plain)
    n = len(fast_calls)
    assert_same_step(loss_and_grads(ckpt), reference, 1e-5)
    assert len(fast_calls) == 3 * n  # the checkpointed model: forward and recomputed forward, both fast


def test_probe_scores_are_the_same_on_the_fast_path(fast_calls):
    model = disable_fast_path(peft_llama())
    batch = padded_batch()
    with ImportanceProbe(model) as reference, torch.no_grad():
        model(**batch)
    enable_fast_path(model)
    with ImportanceProbe(model, record_examples=True) as probe, torch.no_grad():
        model(**batch)
    assert len(fast_calls) == 12
    want, got = reference.raw_scores(), probe.raw_scores()
    assert want.keys() == got.keys()
    for site in want:
        assert got[site] == pytest.approx(want[site], rel=1e-5), site


def test_evaluate_importance_keeps_a_peft_models_setting_and_gives_a_plain_model_the_configs(fast_calls):
    cfg = LoraDropConfig(target_modules=["query", "value"], r=4, sample_ratio=0.5, probe_max_steps=2)
    model = disable_fast_path(get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])))
    evaluate_importance(model, cls_dataset(), cfg)
    assert not fast_calls and not fast_path_enabled(model)
    evaluate_importance(tiny_bert(), cls_dataset(), cfg)
    assert fast_calls
    calls = len(fast_calls)
    evaluate_importance(tiny_bert(), cls_dataset(), LoraDropConfig(**{**cfg.to_dict(), "fast_path": False}))
    assert len(fast_calls) == calls


def test_save_load_and_merge(tmp_path):
    cfg = LoraDropConfig(target_modules=["query", "value"], r=4, rank_dropout=0.3)
    plan = Plan(layers={"query": [0, 1, 2, 3], "value": [0, 1, 2, 3]}, retained={"query": [0], "value": [3]})
    model = apply_plan(tiny_bert(), plan, cfg)
    randomize_lora(model)
    model.eval()
    batch = padded_batch()
    with torch.no_grad():
        want = model(**batch).logits
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(tiny_bert(), tmp_path / "adapter").eval()
    assert fast_path_enabled(loaded)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, want)
        merged = loaded.merge_and_unload()
        assert rel(merged(**batch).logits, want) <= 1e-5


def planned_llama():
    """LoRA-drop (shared LoRA) + DropLoRA + the fast path on a tiny Llama, in eval mode."""
    plan = Plan(layers={t: [0, 1, 2] for t in LLAMA_TARGETS}, retained={t: [1] for t in LLAMA_TARGETS})
    cfg = LoraDropConfig(target_modules=LLAMA_TARGETS, r=4, rank_dropout=0.5)
    model = apply_plan(tiny_llama(layers=3), plan, cfg)
    randomize_lora(model)
    return model.eval()


def test_the_layer_is_a_class_not_a_patched_instance():
    model = planned_llama()
    layers = lora_layers(model)
    assert layers and all(type(layer) is LoraDropLinear and "forward" not in layer.__dict__ for layer in layers.values())
    assert all(layer.rank_dropout.p == 0.5 and layer.fast_path for layer in layers.values())


def test_deepcopy_pickle_and_compile_keep_the_outputs(tmp_path, fast_calls):
    model = planned_llama()
    batch = padded_batch()
    with torch.no_grad():
        want = model(**batch).logits
    assert fast_calls
    torch.save(model, tmp_path / "model.pt")
    restored = torch.load(tmp_path / "model.pt", weights_only=False)
    for other in (copy.deepcopy(model), restored):
        layers = lora_layers(other)
        assert all(type(l) is LoraDropLinear and l.rank_dropout.p == 0.5 for l in layers.values())
        q = {name.split(".")[4]: l.lora_A["default"] for name, l in layers.items() if name.endswith("q_proj")}
        assert q["0"] is q["2"] and q["1"] is not q["0"]  # the tie survives
        with torch.no_grad():
            assert torch.equal(other(**batch).logits, want)
    compiled = torch.compile(model, backend="eager")  # dynamo traces the layer; no C++ compiler needed
    with torch.no_grad():
        assert rel(compiled(**batch).logits, want) <= 1e-6


def test_outside_the_tested_versions_every_call_is_peft(monkeypatch, fast_calls):
    model = planned_llama()
    batch = padded_batch()
    with torch.no_grad():
        want = model(**batch).logits
    calls = len(fast_calls)
    monkeypatch.setattr("loradrop.layer.FAST_PATH_SUPPORTED", False)
    with torch.no_grad():
        assert rel(model(**batch).logits, want) <= 1e-6
    assert len(fast_calls) == calls


def test_a_peft_internal_that_is_missing_means_peft_forward(monkeypatch, fast_calls):
    """A PEFT release that keeps ``merged_adapters`` elsewhere than the instance: the fast path cannot
    read it, so every site runs PEFT's own forward (with the same outputs), instead of raising."""
    model = planned_llama()
    batch = padded_batch()
    with torch.no_grad():
        want = model(**batch).logits
    calls = len(fast_calls)
    monkeypatch.setattr(lora.Linear, "merged_adapters", [], raising=False)
    for layer in lora_layers(model).values():
        monkeypatch.delitem(layer.__dict__, "merged_adapters")
    with torch.no_grad():
        got = model(**batch).logits
    assert len(fast_calls) == calls
    assert rel(got, want) <= 1e-6


# -- fall-backs: PEFT's own forward, bit for bit ------------------------------------------------------
def _peft_and_fast(model, prepare=lambda m: None, train=True, batch=None, seed=0):
    prepare(model)
    model.train(train)
    disable_fast_path(model)
    want = loss_and_grads(model, seed, batch)
    enable_fast_path(model)
    return want, loss_and_grads(model, seed, batch)


def _assert_bitwise(want, got):
    assert torch.equal(want[0], got[0])
    assert want[1].keys() == got[1].keys() and all(torch.equal(want[1][n], got[1][n]) for n in want[1])


def _second_adapter(model):
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "other"])


def _foreign_hook(model):
    seen = []
    next(iter(lora_layers(model).values())).lora_A["default"].register_forward_hook(lambda m, a, o: seen.append(1))
    model.seen = seen


def _base_hook(model):
    next(iter(lora_layers(model).values())).base_layer.register_forward_pre_hook(lambda m, a: None)


def _dropout_hook(model):
    next(iter(lora_layers(model).values())).lora_dropout["default"].register_forward_hook(lambda m, a, o: None)


def _alpha_dropout(model):
    next(iter(lora_layers(model).values())).lora_dropout["default"] = nn.AlphaDropout(0.2)


def _float64_adapter(model):
    layer = next(iter(lora_layers(model).values()))
    layer.lora_A["default"].double(), layer.lora_B["default"].double()


FALLBACKS = {
    "dora": (lambda: peft_llama(use_dora=True), lambda m: None, 0),
    "lora_bias": (lambda: peft_llama(lora_bias=True), lambda m: None, 0),
    "hook_on_lora_dropout": (lambda: peft_llama(lora_dropout=0.2), _dropout_hook, 11),
    "other_dropout_module": (lambda: peft_llama(lora_dropout=0.2), _alpha_dropout, 11),
    "two_active_adapters": (peft_llama, _second_adapter, 10),  # sites without the second adapter stay fast
    "merged": (peft_llama, lambda m: m.merge_adapter(), 0),
    "foreign_hook_on_lora_A": (peft_llama, _foreign_hook, 11),
    "hook_on_base_layer": (peft_llama, _base_hook, 11),
    "mixed_dtypes_without_autocast": (peft_llama, _float64_adapter, 11),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_fall_back_to_peft_where_the_fast_path_does_not_apply(case, fast_calls):
    make, prepare, fast_sites = FALLBACKS[case]
    want, got = _peft_and_fast(make(), prepare)
    _assert_bitwise(want, got) if fast_sites == 0 else assert_same_step(got, want, 1e-5)
    assert len(fast_calls) == fast_sites


def test_foreign_hook_still_runs():
    model = peft_llama()
    _foreign_hook(model)
    enable_fast_path(model)
    model(**padded_batch())
    assert model.seen == [1]


def test_conv1d_gpt2_and_disabled_adapters_fall_back(fast_calls):
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True))
    randomize_lora(model)
    _assert_bitwise(*_peft_and_fast(model))
    model = peft_llama()
    enable_fast_path(model)
    with model.disable_adapter():
        _assert_bitwise(*_peft_and_fast(model))
    assert not fast_calls


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_lora_dropout_matches_peft(train, fast_calls):
    model = peft_llama(lora_dropout=0.2)
    want, got = _peft_and_fast(model, train=train)
    assert_same_step(got, want, 1e-5)
    assert len(fast_calls) == 12
    if train:  # the dropout is really drawn: another seed gives other numbers
        assert rel(loss_and_grads(model, seed=1)[0], got[0]) > 1e-4


def test_lora_dropout_keeps_the_dropped_input_only(fast_calls):
    """With a frozen base the backward keeps x with the dropout applied (for the A gradient), not x too."""
    for train_base in (False, True):
        layer = enable_fast_path(lora_linear(torch.float32, torch.float32, train_base=train_base, lora_dropout=0.3))
        x = torch.randn(5, 24, requires_grad=True)
        node = layer(x).grad_fn.next_functions[0][0]  # under the view back to x's leading shape
        assert type(node).__name__ == "_LoraLinearFunctionBackward"
        saved = node.saved_tensors
        kept = [t for t in saved if t is not None and t.shape == x.shape]
        assert len(kept) == 2 + train_base  # the dropped x and its noise; the undropped x for a trainable base
