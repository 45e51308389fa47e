"""LoRA-drop and DropLoRA on a bitsandbytes 4-bit NF4 base (QLoRA), on the CPU, where bitsandbytes
0.50 runs its 4-bit layers: the probe, the plan's shared LoRA (one storage), training, and the compact
adapter and the PEFT export round-tripping onto a fresh 4-bit base. The base is loaded as users load
it, through transformers' ``BitsAndBytesConfig``."""

import warnings

import bitsandbytes as bnb
import pytest
import torch
from conftest import padded_batch
from peft import PeftModel
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from loradrop import LoraDropConfig, apply_plan, evaluate_importance, export_peft, load_adapter, save_adapter
from loradrop.layer import LoraDropLinear4bit
from loradrop.sites import add_lora, lora_layers

TARGETS = ["q_proj", "v_proj", "up_proj"]
CFG = LoraDropConfig(target_modules=TARGETS, r=4, lora_alpha=8, sample_ratio=1.0, probe_max_steps=4,
                     probe_batch_size=2, probe_lr=1e-2, threshold=0.5, rank_dropout=0.5, seed=0)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_4bit(path) -> LlamaForCausalLM:
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu")


def data(n: int = 8) -> list[dict]:
    return [{k: v[0] for k, v in padded_batch(1, 8, seed=s, with_labels="lm").items()} for s in range(n)]


def test_a_4bit_base_probes_shares_trains_and_round_trips(base_dir, tmp_path):
    base = load_4bit(base_dir)
    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    result = evaluate_importance(base, data(), CFG)
    assert set(result.plan.layers) == set(TARGETS)
    assert any(result.plan.others_of(t) for t in TARGETS)  # T = 0.5 leaves layers to share
    model = apply_plan(add_lora(load_4bit(base_dir), CFG), result.plan, CFG)
    sites = lora_layers(model)
    assert sites and all(isinstance(layer, LoraDropLinear4bit) for layer in sites.values())
    t = next(t for t in TARGETS if len(result.plan.others_of(t)) >= 2)
    shared = [model.base_model.model.model.layers[i] for i in result.plan.others_of(t)]
    module = "self_attn" if t in ("q_proj", "v_proj") else "mlp"
    weights = [getattr(getattr(layer, module), t).lora_A["default"].weight for layer in shared]
    assert len({w.data_ptr() for w in weights}) == 1  # one shared LoRA: one storage

    batch = padded_batch(4, 8, seed=9, with_labels="lm")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    torch.manual_seed(1)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert len({w.data_ptr() for w in weights}) == 1 and weights[0].abs().sum() > 0

    model.eval()  # no rank mask: the saved and exported adapters must give the same outputs
    with torch.no_grad():
        expected = model(**batch).logits
        torch.manual_seed(2)
        model.train()
        masked = model(**batch).logits
        model.eval()
    assert not torch.allclose(masked, expected)  # the rank mask acts on the 4-bit sites in training

    save_adapter(model, tmp_path / "compact")
    loaded = load_adapter(load_4bit(base_dir), tmp_path / "compact").eval()
    reloaded = [getattr(getattr(loaded.base_model.model.model.layers[i], module), t).lora_A["default"].weight
                for i in result.plan.others_of(t)]
    assert len({w.data_ptr() for w in reloaded}) == 1
    export_peft(model, tmp_path / "peft")
    exported = PeftModel.from_pretrained(load_4bit(base_dir), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(exported(**batch).logits, expected, rtol=1e-5, atol=1e-5)
