import pytest
from transformers import T5Config, T5ForConditionalGeneration

from conftest import tiny_bert, tiny_gpt2, tiny_llama
from loradrop import LoraDropConfig, find_sites
from loradrop.sites import add_lora


def types_and_layers(model):
    return sorted({(s.module_type, s.layer) for s in find_sites(model)})


def test_bert_query_value():
    model = add_lora(tiny_bert(layers=3), LoraDropConfig(target_modules=["query", "value"], r=2))
    assert types_and_layers(model) == [(t, i) for t in ("query", "value") for i in range(3)]
    site = [s for s in find_sites(model) if s.module_type == "value" and s.layer == 2][0]
    assert site.name == "base_model.model.bert.encoder.layer.2.attention.self.value"


def test_gpt2_conv1d():
    model = add_lora(tiny_gpt2(layers=2), LoraDropConfig(target_modules=["c_attn"], r=2,
                                                         extra_lora_kwargs={"fan_in_fan_out": True}))
    assert types_and_layers(model) == [("c_attn", 0), ("c_attn", 1)]


def test_llama_all_projections():
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = add_lora(tiny_llama(layers=2), LoraDropConfig(target_modules=names, r=2))
    assert types_and_layers(model) == sorted((t, i) for t in names for i in range(2))


def test_ambiguous_leaf_names_get_longer_types():
    cfg = T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2)
    model = add_lora(T5ForConditionalGeneration(cfg), LoraDropConfig(target_modules=["q"], r=2))
    sites = find_sites(model)
    assert len(sites) == 6  # encoder self, decoder self, decoder cross, 2 layers each
    assert len({(s.module_type, s.layer) for s in sites}) == 6
    assert {s.module_type for s in sites} == {"encoder.block.layer.0.SelfAttention.q",
                                              "decoder.block.layer.0.SelfAttention.q",
                                              "decoder.block.layer.1.EncDecAttention.q"}


def test_model_without_lora_sites():
    with pytest.raises(ValueError, match="no LoRA layers"):
        find_sites(tiny_bert())


def test_target_modules_matching_nothing():
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj'\] match no module of BertForSequenceClassification"):
        add_lora(tiny_bert(), LoraDropConfig(target_modules=["q_proj"]))


def test_module_outside_numbered_layers():
    model = add_lora(tiny_bert(), LoraDropConfig(target_modules=["query", "pooler.dense"], r=2))
    with pytest.raises(ValueError, match=r"bert\.pooler\.dense' has no layer index"):
        find_sites(model)
