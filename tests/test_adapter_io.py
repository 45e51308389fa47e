import dataclasses
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import loradrop.adapter_io as adapter_io
from conftest import padded_batch, randomize_lora, tiny_bert, tiny_llama
from loradrop import (LoraDropConfig, Plan, add_rank_dropout, apply_plan, describe_adapter, export_peft,
                      find_sites, load_adapter, lora_parameter_count, remove_rank_dropout, save_adapter)
from loradrop.rank_dropout import rank_dropout_of
from loradrop.sharing import shared_groups
from loradrop.sites import add_lora

BERT_CFG = LoraDropConfig(target_modules=["query", "value"], r=4, lora_alpha=8, reinit=False)
BERT_PLAN = Plan(layers={"query": [0, 1, 2, 3], "value": [0, 1, 2, 3]}, retained={"query": [1], "value": [0, 2]})
LLAMA_CFG = LoraDropConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4, reinit=False)
LLAMA_PLAN = Plan(layers={t: [0, 1, 2] for t in ("q_proj", "v_proj", "down_proj")},
                  retained={"q_proj": [1], "v_proj": [0, 2], "down_proj": [2]})


def bert_dropped():
    model = apply_plan(tiny_bert(), BERT_PLAN, BERT_CFG)
    randomize_lora(model)
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.mul_(3)
    return model


def llama_dropped(others="shared", rank_dropout=0.0):
    plan = dataclasses.replace(LLAMA_PLAN, others=others)
    cfg = dataclasses.replace(LLAMA_CFG, rank_dropout=rank_dropout)
    model = apply_plan(tiny_llama(), plan, cfg)
    randomize_lora(model)
    return model


def plain_bert():
    model = add_lora(tiny_bert(), BERT_CFG)
    randomize_lora(model)
    return model


def logits(model, batch=None):
    model.eval()
    with torch.no_grad():
        return model(**(batch or padded_batch())).logits


CASES = {
    "plain-lora": (plain_bert, tiny_bert),
    "lora-drop-bert": (bert_dropped, tiny_bert),
    "lora-drop-llama": (llama_dropped, tiny_llama),
    "no-share-llama": (lambda: llama_dropped("dropped"), tiny_llama),
    "lora-drop+droplora": (lambda: llama_dropped(rank_dropout=0.3), tiny_llama),
    "plain+droplora": (lambda: add_rank_dropout(plain_bert(), 0.4, granularity="step"), tiny_bert),
}


@pytest.mark.parametrize("case", CASES)
def test_round_trip_is_bitwise(tmp_path, case):
    make, make_base = CASES[case]
    model = make()
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(make_base(), tmp_path / "a")
    assert torch.equal(logits(loaded), logits(model))
    assert getattr(loaded, "loradrop_plan", None) == getattr(model, "loradrop_plan", None)
    assert rank_dropout_of(loaded) == rank_dropout_of(model)
    assert {t: [s.layer for s in g] for t, g in shared_groups(loaded).items()} == \
           {t: [s.layer for s in g] for t, g in shared_groups(model).items()}
    assert lora_parameter_count(loaded) == lora_parameter_count(model)


def test_loaded_model_keeps_training_with_ties(tmp_path):
    save_adapter(bert_dropped(), tmp_path / "a")
    model = load_adapter(tiny_bert(), tmp_path / "a")
    group = shared_groups(model)["query"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**padded_batch(with_labels="cls")).loss.backward()
    opt.step()
    a = [model.get_submodule(s.name).lora_A["default"] for s in group]
    assert len(find_sites(model)) == 8 and len(a) == 3
    assert all(m is a[0] for m in a) and a[0].weight.grad is not None


def data_bytes(file):
    with open(file, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return os.path.getsize(file) - 8 - header


def test_compact_size_is_retained_plus_shared_over_all_sites(tmp_path):
    model = llama_dropped()
    save_adapter(model, tmp_path / "compact")
    full = add_lora(tiny_llama(), LLAMA_CFG)  # a PEFT LoRA adapter of the same config
    full.save_pretrained(tmp_path / "peft")
    # per type: q_proj 1 + shared of 3, v_proj 2 + shared, down_proj 1 + shared
    compact, peft_bytes = data_bytes(tmp_path / "compact" / adapter_io.WEIGHTS_FILE), data_bytes(tmp_path / "peft" / adapter_io.WEIGHTS_FILE)
    q = 4 * (32 + 32) * 4  # r * (d_in + d_out) float32 bytes per site
    v = 4 * (32 + 16) * 4  # v_proj: 32 -> 16 (2 kv heads of 8)
    down = 4 * (40 + 32) * 4
    assert peft_bytes == 3 * (q + v + down)
    assert compact == 2 * q + 3 * v + 2 * down
    info = describe_adapter(tmp_path / "compact")
    assert info["sites"]["v_proj"] == {"retained": [0, 2], "shared": [1], "dropped": []}
    assert info["trainable_parameters"] == lora_parameter_count(model)
    assert info["bytes_on_disk"] == sum(f.stat().st_size for f in (tmp_path / "compact").iterdir())


EXPORT_SCRIPT = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForSequenceClassification, AutoModelForCausalLM
    from peft import PeftModel
    assert "loradrop" not in sys.modules
    base_dir, adapter_dir, out, kind = sys.argv[1:5]
    cls = AutoModelForSequenceClassification if kind == "cls" else AutoModelForCausalLM
    model = PeftModel.from_pretrained(cls.from_pretrained(base_dir), adapter_dir).eval()
    batch = torch.load(out + ".in")
    with torch.no_grad():
        torch.save(model(**batch).logits, out)
""")


@pytest.mark.parametrize("make,make_base,kind", [(bert_dropped, tiny_bert, "cls"),
                                                 (lambda: llama_dropped("dropped"), tiny_llama, "lm")])
def test_export_loads_in_plain_peft_with_equal_logits(tmp_path, make, make_base, kind):
    model = make()
    make_base().save_pretrained(tmp_path / "base")
    export_peft(model, tmp_path / "peft")
    batch = padded_batch()
    torch.save(batch, tmp_path / "out.in")
    script = tmp_path / "load.py"
    script.write_text(EXPORT_SCRIPT)
    subprocess.run([sys.executable, str(script), str(tmp_path / "base"), str(tmp_path / "peft"), str(tmp_path / "out"), kind],
                   check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert torch.allclose(torch.load(tmp_path / "out"), logits(model, batch), atol=1e-5)
    assert "loradrop" not in json.loads((tmp_path / "peft" / "adapter_config.json").read_text())


def test_merge_and_unload_equals_unmerged(tmp_path):
    model = bert_dropped()
    expected = logits(model)
    export_peft(model, tmp_path / "peft")
    save_adapter(model, tmp_path / "a")
    from peft import PeftModel
    exported = PeftModel.from_pretrained(tiny_bert(), tmp_path / "peft")
    for m in (load_adapter(tiny_bert(), tmp_path / "a"), exported):
        merged = m.merge_and_unload()
        assert torch.allclose(logits(merged), expected, atol=1e-5)


def test_failed_save_leaves_previous_adapter_intact(tmp_path, monkeypatch):
    target = tmp_path / "a"
    save_adapter(bert_dropped(), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def half_way(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(adapter_io, "save_file", half_way)
    with pytest.raises(RuntimeError, match="disk full"):
        save_adapter(plain_bert(), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary directory left


@pytest.fixture
def saved(tmp_path):
    save_adapter(bert_dropped(), tmp_path / "a")
    return tmp_path / "a"


def edit_config(path, change):
    file = path / adapter_io.CONFIG_FILE
    config = json.loads(file.read_text())
    change(config)
    file.write_text(json.dumps(config))


def test_wrong_base_models(saved):
    with pytest.raises(ValueError, match="architecture='BertForSequenceClassification'.*LlamaForCausalLM"):
        load_adapter(tiny_llama(), saved)
    with pytest.raises(ValueError, match="num_hidden_layers=4.*num_hidden_layers=3"):
        load_adapter(tiny_bert(layers=3), saved)
    from transformers import BertConfig, BertForSequenceClassification
    wide = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=48, num_hidden_layers=4,
                                                    num_attention_heads=2, intermediate_size=48))
    with pytest.raises(ValueError, match="hidden_size=32.*hidden_size=48"):
        load_adapter(wide, saved)


def test_missing_and_extra_keys(saved):
    file = saved / adapter_io.WEIGHTS_FILE
    weights = load_file(file)
    missing = {k: v for k, v in weights.items() if "layer.1.attention.self.query" not in k}
    save_file(missing, file)
    with pytest.raises(ValueError, match="missing keys \\['base_model.model.bert.encoder.layer.1.attention.self.query.lora_A.weight'"):
        load_adapter(tiny_bert(), saved)
    save_file({**weights, "base_model.model.bert.pooler.dense.lora_A.weight": torch.zeros(2, 2)}, file)
    with pytest.raises(ValueError, match="extra keys \\['base_model.model.bert.pooler.dense.lora_A.weight'\\]"):
        load_adapter(tiny_bert(), saved)
    shared = {k: v for k, v in weights.items() if not k.startswith("loradrop.shared.value")}
    save_file(shared, file)
    with pytest.raises(ValueError, match="lack the shared LoRA 'loradrop.shared.value.lora_A.weight'"):
        load_adapter(tiny_bert(), saved)


def test_wrong_shape(saved):
    file = saved / adapter_io.WEIGHTS_FILE
    weights = load_file(file)
    key = "loradrop.shared.query.lora_A.weight"
    weights[key] = torch.zeros(5, 32)
    save_file(weights, file)
    with pytest.raises(ValueError, match="has shape \\(5, 32\\) in the adapter but \\(4, 32\\) in the model"):
        load_adapter(tiny_bert(), saved)


def test_truncated_and_corrupt_weights(saved):
    file = saved / adapter_io.WEIGHTS_FILE
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapter(tiny_bert(), saved)
    file.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_adapter(tiny_bert(), saved)
    file.unlink()
    with pytest.raises(ValueError, match="adapter_model.safetensors is missing"):
        load_adapter(tiny_bert(), saved)


def test_missing_unreadable_plan_and_newer_version(saved):
    edit_config(saved, lambda c: c["loradrop"].pop("plan"))
    with pytest.raises(ValueError, match="the loradrop plan is missing"):
        load_adapter(tiny_bert(), saved)
    edit_config(saved, lambda c: c["loradrop"].__setitem__("plan", {"layers": {"query": [0]}}))
    with pytest.raises(ValueError, match="the loradrop plan is unreadable"):
        load_adapter(tiny_bert(), saved)
    edit_config(saved, lambda c: c["loradrop"].__setitem__("format_version", 99))
    with pytest.raises(ValueError, match="format version 99.*upgrade loradrop"):
        load_adapter(tiny_bert(), saved)


def test_not_a_loradrop_adapter(tmp_path):
    export_peft(bert_dropped(), tmp_path / "peft")
    with pytest.raises(ValueError, match="not a loradrop adapter.*PeftModel.from_pretrained"):
        load_adapter(tiny_bert(), tmp_path / "peft")
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        load_adapter(tiny_bert(), tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        describe_adapter(tmp_path / "bad")


def test_save_needs_a_peft_model(tmp_path):
    with pytest.raises(ValueError, match="expected a PEFT model"):
        save_adapter(tiny_bert(), tmp_path / "a")


def test_rank_dropout_switched_off_before_saving_stays_off(tmp_path):
    model = llama_dropped(rank_dropout=0.3)  # its config asks for rank dropout
    remove_rank_dropout(model)
    save_adapter(model, tmp_path / "a")
    assert rank_dropout_of(load_adapter(tiny_llama(), tmp_path / "a")) is None
