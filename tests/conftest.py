"""Tiny models built from configs, so the suite runs in seconds on a CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import loradrop
from loradrop.sites import add_lora

VOCAB = 64


def tiny_bert(num_labels: int = 2, layers: int = 4) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=2, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "\n", "what", "is", "2",
         "+", "3", "?", "5", "the", "answer", "####", "yes", "no", "[UNK]"]


def tiny_chat_tokenizer(chat_template: str | None = CHATML):
    """A word-level tokenizer built offline: one id per word of ``WORDS`` (then fillers up to VOCAB,
    so every id tiny_llama emits decodes), words split on spaces, newlines their own token, ``<s>``
    added in front of plain text, and ChatML's markers as special tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS + [f"w{i}" for i in range(len(WORDS), VOCAB)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
                                                     pre_tokenizers.Split(" ", behavior="removed")])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]",
                                        pad_token="<pad>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny_llama_dir(path, layers: int = 2) -> str:
    """``tiny_llama`` and ``tiny_chat_tokenizer`` saved as a model folder: the real loading path
    (``load_causal_lm`` on a path) at a test's cost."""
    tiny_llama(layers=layers).save_pretrained(path)
    tiny_chat_tokenizer().save_pretrained(path)
    return str(path)


def randomize_lora(model: torch.nn.Module, seed: int = 1) -> None:
    """PEFT initialises B to zero; tests of outputs need LoRA branches that do something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def padded_batch(batch: int = 3, seq: int = 7, seed: int = 0, with_labels: str | None = None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i in range(batch):  # row i has i padding tokens at the end
        if i:
            mask[i, seq - i :] = 0
            ids[i, seq - i :] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if with_labels == "cls":
        out["labels"] = torch.randint(0, 2, (batch,), generator=gen)
    elif with_labels == "lm":
        out["labels"] = ids.masked_fill(mask == 0, -100)
    return out


def cls_dataset(n: int = 40, seq: int = 6, seed: int = 0) -> list[dict]:
    """A learnable toy classification set: the label is whether token 1 appears."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(2, VOCAB, (seq,), generator=gen)
        label = i % 2
        if label:
            ids[0] = 1
        rows.append({"input_ids": ids, "attention_mask": torch.ones(seq, dtype=torch.long), "labels": label})
    return rows


def save_tiny_bert_dir(path, layers: int, dropout: float = 0.1) -> str:
    """A small BERT with the bundled model's real tokenizer, saved as a model folder: the real
    loading path (``load_classifier`` on a path) at a test's cost."""
    from loradrop.models import bundled_model_dir

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir(), local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def bert_cfg() -> loradrop.LoraDropConfig:
    return loradrop.LoraDropConfig(target_modules=["query", "value"], r=4, lora_alpha=8)


@pytest.fixture
def lora_bert(bert_cfg):
    model = add_lora(tiny_bert(), bert_cfg)
    randomize_lora(model)
    return model
