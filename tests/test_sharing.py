import copy
import dataclasses

import pytest
import torch

from conftest import padded_batch, tiny_llama
from loradrop import LoraDropConfig, Plan, apply_plan, find_sites, lora_parameter_count, summary
from loradrop.sharing import shared_groups
from loradrop.sites import lora_layers

# 4 BERT layers; query keeps layer 1, value keeps layers 0 and 2
PLAN = Plan(layers={"query": [0, 1, 2, 3], "value": [0, 1, 2, 3]}, retained={"query": [1], "value": [0, 2]},
            importance={"query": [0.1, 0.6, 0.2, 0.1], "value": [0.4, 0.1, 0.4, 0.1]})
NO_SHARE = Plan(layers=PLAN.layers, retained=PLAN.retained, others="dropped", strategy="no_share")


def untied_twin(model, plan):
    """A deep copy whose non-retained sites hold copies of the lowest such site's weights."""
    twin = copy.deepcopy(model)
    layers = lora_layers(twin)
    for module_type, layers_of_type in plan.layers.items():
        others = [s for s in find_sites(twin) if s.module_type == module_type and s.layer in plan.others_of(module_type)]
        src = layers[others[0].name]
        with torch.no_grad():
            for site in others[1:]:
                for part in ("lora_A", "lora_B"):
                    getattr(layers[site.name], part)["default"].weight.copy_(getattr(src, part)["default"].weight)
    return twin


def test_shared_sites_hold_the_same_modules(lora_bert, bert_cfg):
    cfg = dataclasses.replace(bert_cfg, reinit=False)
    model = apply_plan(lora_bert, PLAN, cfg)
    layers = lora_layers(model)
    groups = shared_groups(model)
    assert {t: [s.layer for s in g] for t, g in groups.items()} == {"query": [0, 2, 3], "value": [1, 3]}
    for group in groups.values():
        first = layers[group[0].name]
        for site in group[1:]:
            layer = layers[site.name]
            assert layer.lora_A["default"] is first.lora_A["default"]
            assert layer.lora_B["default"].weight.data_ptr() == first.lora_B["default"].weight.data_ptr()
    retained = layers[[s for s in find_sites(model) if s.module_type == "query" and s.layer == 1][0].name]
    assert retained.lora_A["default"] is not layers[groups["query"][0].name].lora_A["default"]


def test_outputs_and_gradients_match_an_untied_model(lora_bert, bert_cfg):
    cfg = dataclasses.replace(bert_cfg, reinit=False)
    twin = untied_twin(lora_bert, PLAN)
    model = apply_plan(lora_bert, PLAN, cfg)
    batch = padded_batch(with_labels="cls")
    model.train(), twin.train()
    out, twin_out = model(**batch), twin(**batch)
    assert torch.allclose(out.logits, twin_out.logits, atol=1e-6)
    out.loss.backward()
    twin_out.loss.backward()
    tied, untied = lora_layers(model), lora_layers(twin)
    for module_type, group in shared_groups(model).items():
        for part in ("lora_A", "lora_B"):
            shared_grad = getattr(tied[group[0].name], part)["default"].weight.grad
            summed = sum(getattr(untied[s.name], part)["default"].weight.grad for s in group)
            assert torch.allclose(shared_grad, summed, atol=1e-6)
            single = getattr(untied[group[0].name], part)["default"].weight.grad
            assert not torch.allclose(shared_grad, single, atol=1e-6)  # the sum is not one site's gradient


def test_trainable_count_and_optimizer_see_each_tensor_once(lora_bert, bert_cfg):
    model = apply_plan(lora_bert, PLAN, bert_cfg)
    r, d = bert_cfg.r, 32
    per_site = r * (d + d)
    assert lora_parameter_count(model) == (1 + 1 + 2 + 1) * per_site  # query: 1 + shared, value: 2 + shared
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    params = opt.param_groups[0]["params"]
    lora = {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    assert len({id(p) for p in params}) == len(params)
    assert sum(id(p) in lora for p in params) == 2 * 5  # A and B of 3 retained + 2 shared LoRAs


def test_no_share_drops_lora_and_matches_zeroed_sites(lora_bert, bert_cfg):
    cfg = dataclasses.replace(bert_cfg, reinit=False)
    twin = copy.deepcopy(lora_bert)
    with torch.no_grad():
        for site in find_sites(twin):
            if site.layer not in NO_SHARE.retained[site.module_type]:
                lora_layers(twin)[site.name].lora_B["default"].weight.zero_()
    model = apply_plan(lora_bert, NO_SHARE, cfg)
    assert sorted((s.module_type, s.layer) for s in find_sites(model)) == [("query", 1), ("value", 0), ("value", 2)]
    assert lora_parameter_count(model) == 3 * bert_cfg.r * 64
    batch = padded_batch()
    assert torch.allclose(model(**batch).logits, twin(**batch).logits, atol=1e-6)
    assert "dropped" in summary(model)


def test_reinit_is_peft_init_from_the_seed_and_resets_the_head(lora_bert, bert_cfg):
    with torch.no_grad():
        lora_bert.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    twin = copy.deepcopy(lora_bert)
    a = apply_plan(lora_bert, PLAN, bert_cfg)
    b = apply_plan(twin, PLAN, bert_cfg)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
        if "lora_B" in name:
            assert not p.any()
        if "lora_A" in name:
            assert p.abs().max() <= 1 / (32 ** 0.5) + 1e-6 and p.any()  # kaiming_uniform(a=sqrt(5)) bound 1/sqrt(fan_in)
    head = a.base_model.model.classifier
    assert torch.equal(head.modules_to_save["default"].weight, head.original_module.weight)


def test_apply_plan_to_a_plain_model_and_llama_mlp():
    cfg = LoraDropConfig(target_modules=["up_proj", "down_proj"], r=2)
    plan = Plan(layers={"up_proj": [0, 1, 2], "down_proj": [0, 1, 2]}, retained={"up_proj": [2], "down_proj": [0, 1]})
    model = apply_plan(tiny_llama(), plan, cfg)
    # up: 32 -> 40, down: 40 -> 32; each type: retained + one shared
    assert lora_parameter_count(model) == (1 + 1) * 2 * (32 + 40) + (2 + 1) * 2 * (40 + 32)
    assert model.loradrop_plan is plan


def test_plan_for_another_model_is_refused(lora_bert, bert_cfg):
    wrong = Plan(layers={"query": [0, 1], "value": [0, 1]}, retained={"query": [0], "value": [0]})
    with pytest.raises(ValueError, match="the plan is for sites"):
        apply_plan(lora_bert, wrong, bert_cfg)
    with pytest.raises(ValueError, match="must be a loradrop Plan"):
        apply_plan(lora_bert, {"query": [0]}, bert_cfg)


def test_summary_lists_every_site(lora_bert, bert_cfg):
    text = summary(apply_plan(lora_bert, PLAN, bert_cfg))
    assert text.count(" retained ") == 3 and text.count(" shared ") == 5
    assert "8 sites: 3 retained, 5 shared, 0 dropped" in text
