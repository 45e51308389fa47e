"""The TRL path (issue #16): ``evaluate_importance`` + ``apply_plan`` make the PEFT model that
``trl.SFTTrainer`` trains, with TRL's own completion-only loss, and loradrop saves what it trained.

A tiny 4-layer Llama and the offline word-level chat tokenizer, on CPU. SFTTrainer runs with its
defaults where they matter: gradient checkpointing on, loss on completion tokens only. DropLoRA's rank
mask is on as well. TRL is the pinned extra ``loradrop[trl]``, which ``make setup`` installs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import WORDS, save_tiny_llama_dir, tiny_chat_tokenizer, tiny_llama
from datasets import Dataset, DatasetDict
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

import loradrop
from loradrop.sharing import shared_groups
from loradrop.sites import lora_layers
from loradrop.tasks.generation import encode_example, generation_collator, prompt_completion, tokenize_generation

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sft_trl.py"
LAYERS = 4
# LoRA-wrapped projections of tiny_llama: (in, out); k and v project to 2 kv heads of 32 / 4 = 8
PROJECTIONS = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32), "up_proj": (32, 40),
               "down_proj": (40, 32)}
CFG = loradrop.LoraDropConfig(r=4, lora_alpha=8, threshold=0.3, sample_ratio=0.5, probe_max_steps=4,
                              probe_batch_size=4, probe_lr=1e-2, rank_dropout=0.5)
OPERANDS = ("2", "3", "5", "the", "answer", "yes", "no")
ROWS = [{"prompt": f"what is {a} + {b} ?", "response": "the answer is 5" if (a, b) == ("2", "3") else "no"}
        for a in OPERANDS[:3] for b in OPERANDS]
STEPS = 8
PROMPT_TOKENS = 14  # <|im_start|> user \n what is a + b ? <|im_end|> \n <|im_start|> assistant \n


def word_ids(text: str) -> list[int]:
    """Token ids written down from the tokenizer's word list, independently of the tokenizer."""
    return [WORDS.index(w) for w in text.split(" ")]


def response_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Mean cross-entropy of the next-token predictions at the positions labelled (not -100)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100).item()


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def sft_trainer(model: torch.nn.Module, tokenizer: Any, rows: list[dict], out: Path) -> SFTTrainer:
    """TRL's defaults (gradient checkpointing, completion-only loss) but float32, for exact comparisons."""
    args = SFTConfig(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
                     max_length=32, logging_steps=1, save_strategy="no", report_to=[], seed=0, bf16=False, use_cpu=True,
                     disable_tqdm=True)
    data = Dataset.from_list(rows)
    data = data.map(lambda row: prompt_completion(row, tokenizer), remove_columns=data.column_names)
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """The tiny model's 32-wide matrices gain nothing from torch's threads, and on a shared 2-core
    machine waiting for them made this file several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> dict[str, Any]:
    """Probe, plan, then SFTTrainer for STEPS steps; what the checks need from before and after."""
    tokenizer = tiny_chat_tokenizer()
    probe_data, _ = tokenize_generation(DatasetDict(train=Dataset.from_list(ROWS)), tokenizer, max_length=32)
    collate = generation_collator(tokenizer)
    base = tiny_llama(layers=LAYERS)
    result = loradrop.evaluate_importance(base, probe_data["train"], CFG, collate_fn=collate)
    model = loradrop.apply_plan(base, result, CFG)
    all_rows = collate(list(probe_data["train"]))
    model.eval()
    loss_before = response_loss(model, all_rows)
    before = lora_weights(model)

    trainer = sft_trainer(model, tokenizer, ROWS, tmp_path_factory.mktemp("sft"))
    batches: list[dict[str, torch.Tensor]] = []
    trl_collate = trainer.data_collator

    def recording_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        batches.append(trl_collate(examples))
        return batches[-1]

    trainer.data_collator = recording_collate
    trainer.train()
    model.eval()
    return dict(model=model, result=result, trainer=trainer, tokenizer=tokenizer, batches=batches, before=before,
                loss_before=loss_before, loss_after=response_loss(model, all_rows))


def test_sft_trainer_trains_the_planned_model_and_its_ties(run):
    model, trainer = run["model"], run["trainer"]
    assert trainer.model is model and trainer.model_wrapped is model
    assert trainer.state.global_step == STEPS and trainer.args.gradient_checkpointing
    groups = shared_groups(model)
    assert groups, "the plan should share a LoRA in some module type (threshold 0.3 over 4 layers)"
    layers = lora_layers(model)
    after = lora_weights(model)
    for module_type, sites in groups.items():
        for part in ("lora_A", "lora_B"):
            modules = [getattr(layers[s.name], part)["default"] for s in sites]
            assert all(m is modules[0] for m in modules), (module_type, part)
            assert len({m.weight.data_ptr() for m in modules}) == 1
            name = f"{sites[0].name}.{part}.default.weight"
            assert not torch.equal(after[name], run["before"][name]), f"the shared {part} of {module_type} did not train"


def test_only_the_plans_lora_parameters_train(run):
    model, plan, trainer = run["model"], run["result"].plan, run["trainer"]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # one LoRA per retained layer plus one shared LoRA per type with other layers, r * (in + out) each
    expected = sum((len(plan.retained[t]) + bool(plan.others_of(t))) * CFG.r * sum(PROJECTIONS[t]) for t in plan.layers)
    assert loradrop.lora_parameter_count(model) == expected
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in trainable.values()}
    assert sum(p.numel() for p in optimized) == expected


def test_every_site_learned_and_the_loss_went_down(run):
    for name, layer in lora_layers(run["model"]).items():
        assert layer.lora_B["default"].weight.abs().sum() > 0, f"{name}: lora_B is still zero, no gradient reached it"
    assert run["loss_after"] < run["loss_before"]


def test_trl_labels_only_the_completion(run):
    """The collated batch against token ids written down by hand: the ChatML prompt's tokens are -100, the response and its end of turn are learned, padding is -100."""
    tokenizer = run["tokenizer"]
    batch = run["batches"][0]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    width = batch["input_ids"].shape[1]
    for ids, mask, labels in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()):
        a, b = tokenizer.convert_ids_to_tokens(ids[5:8:2])  # the operands of "what is a + b ?"
        prompt = word_ids("<|im_start|> user \n what is") + word_ids(f"{a} + {b} ?") + \
            word_ids("<|im_end|> \n <|im_start|> assistant \n")
        response = word_ids(next(r["response"] for r in ROWS if r["prompt"] == f"what is {a} + {b} ?")) + \
            word_ids("<|im_end|> \n")
        assert len(prompt) == PROMPT_TOKENS
        pad = width - len(prompt) - len(response)
        assert ids == prompt + response + [tokenizer.pad_token_id] * pad
        assert mask == [1] * (len(prompt) + len(response)) + [0] * pad
        assert labels == [-100] * len(prompt) + response + [-100] * pad


def test_trl_first_loss_is_the_response_cross_entropy(run):
    """Step 1 runs before any update, with every lora_B zero, so its loss is the base model's mean
    cross-entropy over the response tokens of the first batch (every prompt here is 14 tokens)."""
    model, batch = run["model"], run["batches"][0]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :PROMPT_TOKENS] = -100
    with model.disable_adapter():
        expected = response_loss(model, {**batch, "labels": labels})
    assert run["trainer"].state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", ["chat", "chat-messages", "plain"])
def test_trl_tokenizes_prompt_completion_rows_as_the_probe_does(tmp_path, kind):
    """``prompt_completion`` rows, tokenized by SFTTrainer, give exactly ``encode_example``'s tokens and
    labels (the probe's data): with a chat template, with earlier chat turns, and without a template."""
    tokenizer = tiny_chat_tokenizer(chat_template=None) if kind == "plain" else tiny_chat_tokenizer()
    rows = ROWS[:3]
    if kind == "chat-messages":
        rows = [{"messages": [{"role": "system", "content": "the answer"}, {"role": "user", "content": r["prompt"]}],
                 "response": r["response"]} for r in rows]
    trainer = sft_trainer(tiny_llama(layers=1), tokenizer, rows, tmp_path)
    tokenized = [{k: t[k] for k in ("input_ids", "labels")} for t in trainer.train_dataset]
    assert tokenized == [{k: encode_example(r, tokenizer)[k] for k in ("input_ids", "labels")} for r in rows]


def logits(model: torch.nn.Module) -> torch.Tensor:
    batch = torch.tensor([word_ids("<|im_start|> user \n what is 2 + 3 ? <|im_end|> \n <|im_start|> assistant \n")])
    with torch.no_grad():
        return model.eval()(input_ids=batch).logits


def test_the_trained_adapter_saves_and_loads_back(run, tmp_path):
    model = run["model"]
    loradrop.save_adapter(model, tmp_path / "adapter")
    loaded = loradrop.load_adapter(tiny_llama(layers=LAYERS), tmp_path / "adapter")
    assert torch.equal(logits(loaded), logits(model))
    assert {t: [s.layer for s in g] for t, g in shared_groups(loaded).items()} == \
           {t: [s.layer for s in g] for t, g in shared_groups(model).items()}
    loradrop.export_peft(model, tmp_path / "peft")
    exported = PeftModel.from_pretrained(tiny_llama(layers=LAYERS), tmp_path / "peft")
    torch.testing.assert_close(logits(exported), logits(model), rtol=0, atol=1e-6)


def test_the_documented_example_runs(tmp_path):
    """examples/sft_trl.py end to end on a tiny model folder and a JSONL file, DropLoRA on: the adapter
    it saves loads (compact and PEFT format alike) and was trained."""
    model_dir = save_tiny_llama_dir(tmp_path / "model", layers=3)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": r["prompt"], "a": r["response"]}) + "\n" for r in ROWS))
    out = tmp_path / "out"
    command = [sys.executable, str(EXAMPLE), "--out", str(out), "--model", model_dir, "--data", str(data),
               "--prompt-column", "q", "--response-column", "a", "--max-length", "24", "--threshold", "0.5",
               "--sample-ratio", "0.5", "--probe-max-steps", "2", "--rank-dropout", "0.5", "--max-steps", "2",
               "--batch-size", "4", "--learning-rate", "1e-2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})  # see one_thread
    assert done.returncode == 0, done.stderr[-3000:]
    assert "18 sites:" in done.stdout and "validation loss per completion token" in done.stdout
    described = loradrop.describe_adapter(out / "adapter")
    assert described["rank_dropout"]["p"] == 0.5
    assert any(roles["shared"] for roles in described["sites"].values())
    loaded = loradrop.load_adapter(tiny_llama(layers=3), out / "adapter")
    assert all(layer.lora_B["default"].weight.abs().sum() > 0 for layer in lora_layers(loaded).values())
    exported = PeftModel.from_pretrained(tiny_llama(layers=3), out / "peft")
    torch.testing.assert_close(logits(exported), logits(loaded), rtol=0, atol=1e-6)
