import json

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from conftest import cls_dataset, padded_batch, randomize_lora, tiny_bert, tiny_llama
from loradrop import ImportanceProbe, LoraDropConfig, evaluate_importance, find_sites, select
from loradrop.sites import add_lora, lora_layers


def reference_g(model, batch, use_mask=True, counted=None):
    """||scaling * B A x||^2 from the LoRA weights and the inputs each site saw, in float64, over the
    tokens of ``counted`` (default: the attention mask's)."""
    inputs = {}
    layers = lora_layers(model)
    handles = [layer.register_forward_pre_hook(lambda m, a, name=name: inputs.__setitem__(name, a[0].detach()))
               for name, layer in layers.items()]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    mask = (batch["attention_mask"] if counted is None else counted).double()
    g = {}
    for site in find_sites(model):
        layer = layers[site.name]
        a = layer.lora_A["default"].weight.double()
        b = layer.lora_B["default"].weight.double()
        out = layer.scaling["default"] * inputs[site.name].double() @ a.T @ b.T
        per_token = out.square().sum(-1)
        g.setdefault(site.module_type, {})[site.layer] = (per_token * mask if use_mask else per_token).sum().item()
    return g


@pytest.mark.parametrize("make,targets", [(tiny_bert, ["query", "value"]),
                                          (tiny_llama, ["q_proj", "v_proj", "down_proj"])])
def test_probe_matches_reference_on_padded_batches(make, targets):
    model = add_lora(make(), LoraDropConfig(target_modules=targets, r=4, lora_alpha=12))
    randomize_lora(model)
    model.eval()
    batches = [padded_batch(seed=s) for s in range(2)]
    with ImportanceProbe(model) as probe, torch.no_grad():
        for batch in batches:
            model(**batch)
    g, importance = probe.scores()
    expected = {}
    for batch in batches:
        for t, per_layer in reference_g(model, batch).items():
            for layer, v in per_layer.items():
                expected.setdefault(t, {}).setdefault(layer, 0.0)
                expected[t][layer] += v
    assert set(g) == set(targets)
    for t in targets:
        assert g[t].keys() == expected[t].keys()
        for layer in g[t]:
            assert g[t][layer] == pytest.approx(expected[t][layer], rel=1e-5)
        assert sum(importance[t].values()) == pytest.approx(1.0)
        assert importance[t][0] == pytest.approx(g[t][0] / sum(g[t].values()))
    t = targets[0]  # the reference can tell padding apart: counting it would change g
    assert reference_g(model, batches[0], use_mask=False)[t][0] > 1.001 * reference_g(model, batches[0])[t][0]


def test_hooks_are_removed_and_outputs_unchanged(lora_bert):
    batch = padded_batch()
    before = lora_bert(**batch).logits
    with ImportanceProbe(lora_bert):
        during = lora_bert(**batch).logits
    assert torch.equal(before, during)
    assert not lora_bert._forward_pre_hooks and not lora_bert._forward_pre_hooks_with_kwargs
    for layer in lora_layers(lora_bert).values():
        assert not layer._forward_hooks and not layer._forward_pre_hooks
        assert not layer.lora_B["default"]._forward_hooks


def test_a_probe_that_fails_to_start_leaves_no_hook(lora_bert):
    with pytest.raises(ValueError, match="no LoRA adapter named 'other'"):
        with ImportanceProbe(lora_bert, adapter_name="other"):
            pass
    assert not lora_bert._forward_pre_hooks and not lora_bert._forward_pre_hooks_with_kwargs


def test_all_zero_importance_is_an_error():
    model = add_lora(tiny_bert(), LoraDropConfig(target_modules=["query"], r=2))  # B = 0: no output yet
    with ImportanceProbe(model) as probe, torch.no_grad():
        model(**padded_batch())
    with pytest.raises(ValueError, match="every LoRA output of 'query' is zero.*probe_epochs"):
        probe.scores()


def test_evaluate_importance_on_a_plain_model_leaves_it_as_it_was():
    model = tiny_bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = LoraDropConfig(target_modules=["query", "value"], r=4, sample_ratio=0.5, probe_epochs=2,
                         probe_batch_size=4, probe_lr=1e-2)
    result = evaluate_importance(model, cls_dataset(40), cfg)
    assert result.sample_size == 20 and result.probe_steps == 10
    assert set(result.importance) == {"query", "value"}
    for t in ("query", "value"):
        assert sorted(result.importance[t]) == [0, 1, 2, 3]
        assert sum(result.importance[t].values()) == pytest.approx(1.0)
        assert all(v > 0 for v in result.g[t].values())
    assert result.plan.layers == {"query": [0, 1, 2, 3], "value": [0, 1, 2, 3]}
    assert not lora_layers(model) and type(model.classifier) is torch.nn.Linear
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in result.lora_state.items())


def test_evaluate_importance_trains_a_peft_model_in_place_but_not_its_base():
    cfg = LoraDropConfig(target_modules=["q_proj", "v_proj"], r=4, sample_ratio=1.0, probe_max_steps=3,
                         probe_batch_size=2, probe_lr=1e-2)
    model = add_lora(tiny_llama(), cfg)
    base = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    data = [{k: v[0] for k, v in padded_batch(1, 6, seed=s, with_labels="lm").items()} for s in range(6)]
    result = evaluate_importance(model, data, cfg)
    assert result.probe_steps == 3 and result.lora_state is None
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_evaluate_importance_without_labels_says_so():
    cfg = LoraDropConfig(target_modules=["query"], r=2, sample_ratio=1.0, probe_max_steps=1)
    data = [{k: v[0] for k, v in padded_batch(1, 5, seed=s).items()} for s in range(3)]
    with pytest.raises(ValueError, match="needs a labels column"):
        evaluate_importance(tiny_bert(), data, cfg)


def test_evaluate_importance_on_empty_data():
    with pytest.raises(ValueError, match="empty"):
        evaluate_importance(tiny_bert(), [], LoraDropConfig(target_modules=["query"]))


def test_recorded_example_norms_add_up_to_g(lora_bert):
    batch = padded_batch()
    with ImportanceProbe(lora_bert, record_examples=True) as probe, torch.no_grad():
        lora_bert(**batch)
        lora_bert(**padded_batch(seed=1))
    g, _ = probe.scores()
    norms = probe.example_norms()
    for site, values in norms.items():
        assert values.shape == (6,)  # two batches of three examples
        assert values.sum().item() == pytest.approx(g[site.module_type][site.layer], rel=1e-6)
    first = reference_g(lora_bert, {k: v[:1] for k, v in batch.items()})
    site = next(iter(norms))
    assert norms[site][0].item() == pytest.approx(first[site.module_type][site.layer], rel=1e-5)

def test_response_tokens_only_counts_the_tokens_the_loss_is_on():
    model = add_lora(tiny_llama(), LoraDropConfig(target_modules=["q_proj", "down_proj"], r=4, lora_alpha=12))
    randomize_lora(model)
    model.eval()
    batch = padded_batch(with_labels="lm")
    batch["labels"][:, :3] = -100  # a 3-token prompt; padding is -100 already
    with ImportanceProbe(model, tokens="response") as probe, torch.no_grad():
        model(**batch)
    g, _ = probe.scores()
    expected = reference_g(model, batch, counted=batch["labels"] != -100)
    everything = reference_g(model, batch)
    for t in g:
        for layer in g[t]:
            assert g[t][layer] == pytest.approx(expected[t][layer], rel=1e-5)
            assert expected[t][layer] < everything[t][layer]  # the prompt's tokens are left out


def test_response_tokens_need_token_labels(lora_bert):
    with ImportanceProbe(lora_bert, tokens="response"), pytest.raises(ValueError, match="no token labels"):
        lora_bert(**padded_batch())
    with pytest.raises(ValueError, match="tokens='outputs' is invalid"):
        ImportanceProbe(lora_bert, tokens="outputs")
    with pytest.raises(ValueError, match="probe_tokens='outputs' is invalid"):
        LoraDropConfig(probe_tokens="outputs")


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
