import pytest
import torch
from conftest import tiny_chat_tokenizer
from datasets import Dataset, DatasetDict

from loradrop.tasks.generation import (
    LengthReport,
    encode_example,
    format_example,
    format_prompt,
    generation_collator,
    tokenize_generation,
)

ROW = {"prompt": "what is 2 + 3 ?", "response": "5"}
# <|im_start|> user \n what is 2 + 3 ? <|im_end|> \n <|im_start|> assistant \n   (14 tokens)
CHAT_PROMPT_IDS = [3, 5, 8, 9, 10, 11, 12, 13, 14, 4, 8, 3, 6, 8]
CHAT_RESPONSE_IDS = [15, 4, 8]  # 5 <|im_end|> \n


def data(*rows: dict) -> DatasetDict:
    rows = rows or (ROW,)
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    return DatasetDict(train=Dataset.from_dict(columns), validation=Dataset.from_dict(columns))


def test_chat_template_formatting():
    prompt, response = format_example(ROW, tiny_chat_tokenizer())
    assert prompt == "<|im_start|>user\nwhat is 2 + 3 ?<|im_end|>\n<|im_start|>assistant\n"
    assert response == "5<|im_end|>\n"
    assert format_prompt({"prompt": ROW["prompt"]}, tiny_chat_tokenizer()) == prompt


def test_labels_mask_exactly_the_prompt_tokens():
    encoded = encode_example(ROW, tiny_chat_tokenizer())
    assert encoded["input_ids"] == CHAT_PROMPT_IDS + CHAT_RESPONSE_IDS
    assert encoded["labels"] == [-100] * 14 + CHAT_RESPONSE_IDS
    assert encoded["attention_mask"] == [1] * 17


def test_chat_messages_mask_every_earlier_turn():
    row = {"messages": [{"role": "system", "content": "the answer"}, {"role": "user", "content": "2 + 3 ?"}],
           "response": "5"}
    encoded = encode_example(row, tiny_chat_tokenizer())
    # <|im_start|> system \n the answer <|im_end|> \n <|im_start|> user \n 2 + 3 ? <|im_end|> \n <|im_start|> assistant \n
    prompt = [3, 7, 8, 16, 17, 4, 8, 3, 5, 8, 11, 12, 13, 14, 4, 8, 3, 6, 8]
    assert encoded["input_ids"] == prompt + CHAT_RESPONSE_IDS
    assert encoded["labels"] == [-100] * len(prompt) + CHAT_RESPONSE_IDS


def test_plain_prompt_without_chat_template():
    tokenizer = tiny_chat_tokenizer(chat_template=None)
    assert format_example(ROW, tokenizer) == ("what is 2 + 3 ?\n", "5</s>")
    encoded = encode_example(ROW, tokenizer)
    assert encoded["input_ids"] == [1, 9, 10, 11, 12, 13, 14, 8, 15, 2]  # <s> ... \n 5 </s>
    assert encoded["labels"] == [-100] * 8 + [15, 2]


def test_chat_data_without_template_is_refused():
    row = {"messages": [{"role": "user", "content": "2"}], "response": "5"}
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        format_example(row, tiny_chat_tokenizer(chat_template=None))


def test_failing_chat_template_is_one_clear_error():
    tokenizer = tiny_chat_tokenizer("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="chat template failed.*roles must alternate"):
        format_example(ROW, tokenizer)


def test_drop_policy_counts_dropped_examples():
    long = {"prompt": "what is 2 + 3 + 3 + 3 ?", "response": "the answer is 5"}  # 18 + 6 tokens
    tokenized, report = tokenize_generation(data(ROW, long), tiny_chat_tokenizer(), max_length=17)
    assert report == {"train": LengthReport(kept=1, dropped=1, truncated=0),
                      "validation": LengthReport(kept=1, dropped=1, truncated=0)}
    assert tokenized["train"]["input_ids"] == [CHAT_PROMPT_IDS + CHAT_RESPONSE_IDS]
    assert tokenized["train"]["length"] == [17]


def test_truncate_policy_cuts_the_response():
    tokenized, report = tokenize_generation(data(), tiny_chat_tokenizer(), max_length=15, truncation="truncate")
    assert report["train"] == LengthReport(kept=1, dropped=0, truncated=1)
    assert tokenized["train"][0]["input_ids"] == CHAT_PROMPT_IDS + [15]
    assert tokenized["train"][0]["labels"] == [-100] * 14 + [15]


def test_prompt_without_room_for_the_response():
    with pytest.raises(ValueError, match="prompt alone is 14 tokens.*max_length=14: raise max_length"):
        tokenize_generation(data(), tiny_chat_tokenizer(), max_length=14, truncation="truncate")
    with pytest.raises(ValueError, match="every train example is longer than max_length=14"):
        tokenize_generation(data(), tiny_chat_tokenizer(), max_length=14)


def test_bad_policy_and_length():
    with pytest.raises(ValueError, match="truncation='cut' is invalid: must be one of drop, truncate"):
        tokenize_generation(data(), tiny_chat_tokenizer(), truncation="cut")
    with pytest.raises(ValueError, match="max_length=1 is invalid"):
        tokenize_generation(data(), tiny_chat_tokenizer(), max_length=1)


def test_collator_pads_labels_with_ignore_index():
    tokenizer = tiny_chat_tokenizer(chat_template=None)
    tokenized, _ = tokenize_generation(data(ROW, {"prompt": "2 ?", "response": "no"}), tokenizer)
    batch = generation_collator(tokenizer)([tokenized["train"][0], tokenized["train"][1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # length is the sampler's, not the model's
    # second row: <s> 2 ? \n no </s>, padded on the right to 10
    assert batch["input_ids"][1].tolist() == [1, 11, 14, 8, 20, 2, 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [-100, -100, -100, -100, 20, 2, -100, -100, -100, -100]
    assert batch["attention_mask"][1].tolist() == [1] * 6 + [0] * 4
    assert batch["labels"].dtype == torch.long
