"""Issue 15, cases 7b (the probe's padding mask) and 7c (importance that does not sum to 1)."""

import json

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from conftest import padded_batch, randomize_lora
from loradrop import ImportanceProbe, LoraDropConfig, find_sites, select
from loradrop.sites import add_lora, lora_layers


# -- case 7b: the probe's padding mask ------------------------------------------------------------------
def probe_g(model, calls):
    with ImportanceProbe(model) as probe, torch.no_grad():
        for call in calls:
            call()
    return probe.raw_scores()


def test_a_positional_attention_mask_masks_padding(lora_bert):
    batch = padded_batch()
    by_keyword = probe_g(lora_bert, [lambda: lora_bert(**batch)])
    by_position = probe_g(lora_bert, [lambda: lora_bert(batch["input_ids"], batch["attention_mask"])])
    for site in by_keyword:
        assert by_position[site] == pytest.approx(by_keyword[site], rel=1e-6)


def test_without_a_mask_every_token_counts(lora_bert):
    ids = padded_batch()["input_ids"]
    without = probe_g(lora_bert, [lambda: lora_bert(input_ids=ids)])
    ones = probe_g(lora_bert, [lambda: lora_bert(input_ids=ids, attention_mask=torch.ones_like(ids))])
    for site in without:
        assert without[site] == pytest.approx(ones[site], rel=1e-6)


def test_a_mask_that_does_not_fit_the_sites_tokens_is_an_error(lora_bert):
    site = find_sites(lora_bert)[0]
    with ImportanceProbe(lora_bert) as probe:
        probe._mask = torch.ones(2, 5)
        with pytest.raises(ValueError, match=f"attention_mask of this batch has shape \\(2, 5\\) but site '{site.name}'"):
            probe._mask_of(site, torch.zeros(2, 6))


def tiny_t5():
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                               dropout_rate=0.0, decoder_start_token_id=0)).eval()


def test_decoder_sites_of_an_encoder_decoder_model_use_the_decoder_mask():
    model = add_lora(tiny_t5(), LoraDropConfig(target_modules=["q", "v"], r=4))
    randomize_lora(model)
    enc = padded_batch(batch=3, seq=7, seed=0)
    dec = padded_batch(batch=3, seq=5, seed=1)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "decoder_input_ids": dec["input_ids"], "decoder_attention_mask": dec["attention_mask"]}
    inputs, layers = {}, lora_layers(model)
    handles = [layer.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0].detach()))
               for name, layer in layers.items()]
    g = probe_g(model, [lambda: model(**batch)])
    for h in handles:
        h.remove()
    kinds = set()
    for site in find_sites(model):
        layer = layers[site.name]
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        per_token = (layer.scaling["default"] * inputs[site.name].double() @ a.T @ b.T).square().sum(-1)
        cross_kv = "EncDecAttention" in site.name and site.name.endswith(".v")
        mask = dec["attention_mask"] if ".decoder." in site.name and not cross_kv else enc["attention_mask"]
        kinds.add(("decoder" if mask is dec["attention_mask"] else "encoder", site.name.split(".")[-2]))
        assert g[site] == pytest.approx((per_token * mask).sum().item(), rel=1e-5), site.name
    assert ("decoder", "SelfAttention") in kinds and ("encoder", "EncDecAttention") in kinds
    assert ("decoder", "EncDecAttention") in kinds  # the cross-attention query reads the decoder's tokens

    # without decoder_attention_mask, the labels' -100 positions are the decoder's padding
    labels = dec["input_ids"].masked_fill(dec["attention_mask"] == 0, -100)
    from_labels = probe_g(model, [lambda: model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                                labels=labels)])
    shifted = model.prepare_decoder_input_ids_from_labels(labels=labels)
    explicit = probe_g(model, [lambda: model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                             decoder_input_ids=shifted, decoder_attention_mask=labels != -100)])
    for site in g:
        assert from_labels[site] == pytest.approx(explicit[site], rel=1e-6), site.name


# -- case 7c: importance must be normalised per type ---------------------------------------------------
def test_select_refuses_importance_that_does_not_sum_to_one():
    cfg = LoraDropConfig(target_modules=["q"])
    with pytest.raises(ValueError, match="must sum to 1 within each module type .* q: 1.2, v: 1"):
        select({"q": {0: 0.5, 1: 0.7}, "v": {0: 0.25, 1: 0.75}}, cfg)
    with pytest.raises(ValueError, match="finite and non-negative"):
        select({"q": {0: float("nan"), 1: 1.0}}, cfg)
    with pytest.raises(ValueError, match="finite and non-negative"):
        select({"q": {0: -0.5, 1: 1.5}}, cfg)
    assert select({"q": {0: 0.7, 1: 0.2, 2: 0.1}}, cfg).retained == {"q": [0, 1]}  # 0.99999... is 1
    assert json.loads(json.dumps(1.0)) == 1.0
