import copy
import math

import pytest
import torch

from conftest import padded_batch, randomize_lora, tiny_bert, tiny_llama
from loradrop import LoraDropConfig, Plan, RankDropoutConfig, add_rank_dropout, apply_plan, remove_rank_dropout
from loradrop.rank_dropout import rank_dropout_of
from loradrop.sites import add_lora, lora_layers


def record_masks(model):
    """Per site call: the kept entries of the hidden and their ratio to the unmasked hidden. A hook on
    lora_A records the unmasked hidden; the site's observer slot is given the masked one."""
    calls, unmasked = [], []
    seen = set()
    for layer in lora_layers(model).values():
        lora_a = layer.lora_A["default"]
        if id(lora_a) not in seen:
            seen.add(id(lora_a))
            lora_a.register_forward_hook(lambda module, args, out: unmasked.append(out.detach()))

        def observe(masked):
            h, kept = unmasked.pop(), masked != 0
            calls.append((kept, masked[kept] / h[kept]))

        layer.observer = observe
    return calls


def llama_with_lora(r=8):
    model = add_lora(tiny_llama(layers=2), LoraDropConfig(target_modules=["q_proj", "v_proj"], r=r))
    randomize_lora(model)
    return model


@pytest.mark.parametrize("granularity", ["token", "sample", "step"])
def test_dropped_fraction_matches_p(granularity):
    p = 0.3
    model = add_rank_dropout(llama_with_lora(), p, granularity=granularity)
    calls = record_masks(model)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        for step in range(60):
            model(**padded_batch(4, 6, seed=step))
    dropped, draws = 0, 0
    for kept, ratio in calls:
        if granularity == "step":
            per_draw = kept.reshape(-1, kept.shape[-1])[0]  # one r-vector for the whole forward
            assert torch.equal(kept, per_draw.expand_as(kept))
        elif granularity == "sample":
            per_draw = kept[:, 0, :]
            assert torch.equal(kept, per_draw[:, None, :].expand_as(kept))
        else:
            per_draw = kept
        dropped += int((~per_draw).sum())
        draws += per_draw.numel()
        assert torch.allclose(ratio, torch.full_like(ratio, 1 / (1 - p)), rtol=1e-4)  # inverted dropout
    bound = 4 * math.sqrt(p * (1 - p) / draws)
    assert abs(dropped / draws - p) < bound, (dropped / draws, bound)


def test_no_rescale_keeps_values():
    model = add_rank_dropout(llama_with_lora(), RankDropoutConfig(0.5, "token", rescale=False))
    calls = record_masks(model)
    model.train()
    model(**padded_batch())
    assert all(torch.allclose(ratio, torch.ones_like(ratio), rtol=1e-4) for _, ratio in calls)


def test_step_mask_zeroes_gradients_of_dropped_ranks():
    model = add_rank_dropout(llama_with_lora(r=8), 0.5, granularity="step")
    calls = record_masks(model)
    model.train()
    torch.manual_seed(3)
    model(**padded_batch(with_labels="lm")).loss.backward()
    layers = list(lora_layers(model).values())
    for layer, (kept, _) in zip(layers, calls):
        kept_ranks = kept.reshape(-1, kept.shape[-1])[0]
        assert 0 < kept_ranks.sum() < 8  # this seed drops some ranks and keeps some
        grad_a = layer.lora_A["default"].weight.grad  # (r, d_in): rows are ranks
        grad_b = layer.lora_B["default"].weight.grad  # (d_out, r): columns are ranks
        assert not grad_a[~kept_ranks].any() and not grad_b[:, ~kept_ranks].any()
        assert grad_a[kept_ranks].abs().sum(1).min() > 0 and grad_b[:, kept_ranks].abs().sum(0).min() > 0


def test_eval_is_plain_lora_and_p_zero_trains_as_plain_lora():
    plain = llama_with_lora()
    dropped = add_rank_dropout(copy.deepcopy(plain), 0.5)
    batch = padded_batch()
    assert torch.equal(dropped.eval()(**batch).logits, plain.eval()(**batch).logits)
    zero = add_rank_dropout(copy.deepcopy(plain), 0.0)
    assert torch.equal(zero.train()(**batch).logits, plain.train()(**batch).logits)
    assert not torch.equal(dropped.train()(**batch).logits, plain.train()(**batch).logits)


def test_same_seed_same_masks():
    model = add_rank_dropout(llama_with_lora(), 0.5)
    model.train()
    batch = padded_batch()
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(model(**batch).logits)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("granularity", ["token", "step"])
def test_gradient_checkpointing_replays_the_masks(granularity):
    base = add_rank_dropout(llama_with_lora(), 0.5, granularity=granularity)
    ckpt = copy.deepcopy(base)  # the rank mask is an attribute of each site: deepcopy carries it
    ckpt.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ckpt.base_model.model.is_gradient_checkpointing
    batch = padded_batch(with_labels="lm")
    grads = []
    for model, seed in ((base, 5), (ckpt, 5), (base, 6)):
        model.train()
        model.zero_grad()
        torch.manual_seed(seed)
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
    assert any(not torch.allclose(grads[0][n], grads[2][n]) for n in grads[0])  # another seed differs


def test_shared_lora_sites_draw_independent_masks():
    cfg = LoraDropConfig(target_modules=["query"], r=8, rank_dropout=0.5, rank_dropout_granularity="step")
    plan = Plan(layers={"query": [0, 1, 2, 3]}, retained={"query": [0]})
    model = apply_plan(tiny_bert(), plan, cfg)
    assert rank_dropout_of(model) == cfg.rank_dropout_config
    calls = record_masks(model)  # layer 0's own lora_A, then the shared one that layers 1-3 call
    randomize_lora(model)
    model.train()
    torch.manual_seed(0)
    for step in range(4):
        model(**padded_batch(seed=step))
    assert len(calls) == 16  # 4 forwards x 4 sites, in layer order
    per_forward = [[kept.reshape(-1, 8)[0] for kept, _ in calls[i * 4 : i * 4 + 4]] for i in range(4)]
    differing = sum(not torch.equal(f[1], f[2]) or not torch.equal(f[2], f[3]) for f in per_forward)
    assert differing >= 3  # identical masks for three sites in a forward: probability 1/65536


def test_remove_leaves_plain_peft_model():
    plain = llama_with_lora()
    model = add_rank_dropout(copy.deepcopy(plain), 0.5)
    add_rank_dropout(model, 0.2, granularity="sample")  # replaces, does not stack
    assert {l.rank_dropout for l in lora_layers(model).values()} == {RankDropoutConfig(0.2, "sample")}
    remove_rank_dropout(model)
    assert rank_dropout_of(model) is None
    assert all(l.rank_dropout is None for l in lora_layers(model).values())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # nothing left behind
    batch = padded_batch()
    assert torch.equal(model.train()(**batch).logits, plain.train()(**batch).logits)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_invalid_p(p):
    with pytest.raises(ValueError, match=f"rank_dropout={p!r}"):
        add_rank_dropout(llama_with_lora(), p)


def test_invalid_granularity_and_dora():
    with pytest.raises(ValueError, match="rank_dropout_granularity='layer'"):
        add_rank_dropout(llama_with_lora(), 0.5, granularity="layer")
    dora = add_lora(tiny_llama(), LoraDropConfig(target_modules=["q_proj"], r=2, extra_lora_kwargs={"use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        add_rank_dropout(dora, 0.5)


def test_a_refused_rank_dropout_keeps_the_mask_that_was_on():
    model = add_rank_dropout(llama_with_lora(), 0.3)
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        add_rank_dropout(model, 0.5, adapter_name="other")
    assert rank_dropout_of(model).p == 0.3
    assert all(l.rank_dropout.p == 0.3 for l in lora_layers(model).values())
