import math

import pytest
import torch
from conftest import tiny_chat_tokenizer, tiny_llama
from datasets import Dataset, DatasetDict

from loradrop.generate_eval import evaluate_generation, generate, validation_loss
from loradrop.tasks.gen_metrics import compute_generation_metrics
from loradrop.tasks.generation import format_prompt, tokenize_generation

ROWS = [{"prompt": "what is 2 + 3 ?", "response": "5"},
        {"prompt": "2 ?", "response": "no"},
        {"prompt": "is the answer 5 ?", "response": "yes the answer is 5"}]


def greedy_one(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The reference: one prompt, no padding, argmax token by token with the full forward each step."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def model():
    """tiny_llama with weights of std 0.3: at the usual 0.02 every prompt gets the same continuation,
    which would hide a padding bug."""
    model = tiny_llama()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def test_batched_left_padded_generation_matches_one_by_one(model):
    tokenizer = tiny_chat_tokenizer()
    prompts = [format_prompt(r, tokenizer) for r in ROWS]
    expected = [greedy_one(model, tokenizer, p, 6) for p in prompts]
    assert len(set(expected)) == 3 and all(expected)  # distinct, so a misaligned row would show
    model.train()
    assert generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=2) == expected
    assert model.training and tokenizer.padding_side == "right"  # both restored


def test_evaluate_generation_scores_the_predictions(model):
    tokenizer = tiny_chat_tokenizer()
    data = Dataset.from_list(ROWS)
    result = evaluate_generation(model, tokenizer, data, "rougeL", max_new_tokens=4, batch_size=3, max_examples=2)
    assert result.references == ["5", "no"]
    assert result.predictions == [greedy_one(model, tokenizer, format_prompt(r, tokenizer), 4) for r in ROWS[:2]]
    assert result.scores == compute_generation_metrics("rougeL", result.predictions, ["5", "no"])


def test_validation_loss_is_token_weighted(model):
    tokenizer = tiny_chat_tokenizer()
    tokenized, _ = tokenize_generation(DatasetDict(validation=Dataset.from_list(ROWS)), tokenizer)
    parts = []
    with torch.no_grad():
        for row in tokenized["validation"]:
            out = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]]))
            parts.append((out.loss.item(), sum(label != -100 for label in row["labels"][1:])))
    expected = sum(loss * n for loss, n in parts) / sum(n for _, n in parts)
    scores = validation_loss(model, tokenizer, tokenized["validation"], batch_size=2)
    assert scores["loss"] == pytest.approx(expected, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_bad_arguments(model):
    tokenizer = tiny_chat_tokenizer()
    with pytest.raises(ValueError, match="max_new_tokens=0 is invalid"):
        generate(model, tokenizer, ["2"], max_new_tokens=0)
    with pytest.raises(ValueError, match="evaluation data set is empty"):
        evaluate_generation(model, tokenizer, Dataset.from_dict({"prompt": [], "response": []}), "bleu")
