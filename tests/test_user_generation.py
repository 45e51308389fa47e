import json

import pytest

from loradrop.tasks.user_generation import load_user_generation_task


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n=10):
    return [{"question": f"what is {i} + 1 ?", "answer": f"{i + 1}"} for i in range(n)]


def chat(i):
    return {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"add 1 to {i}"},
                         {"role": "assistant", "content": f"{i + 1}"}]}


def test_prompt_response_columns(tmp_path):
    rows = qa_rows() + [{"question": "What is 3 + 1 ?", "answer": "four"}]  # a copy of row 3 up to case
    task, data = load_user_generation_task(write_jsonl(tmp_path / "qa.jsonl", rows), "question", "answer",
                                           validation_ratio=0.2, metric="exact_match")
    assert (task.label_kind, task.metric, task.text_column, task.name) == ("generation", "exact_match", "prompt", "qa")
    assert data["train"].column_names == ["prompt", "response"]
    train, val = list(data["train"]), list(data["validation"])
    assert len(train) + len(val) == 11
    assert dict((r["prompt"], r["response"]) for r in train + val)["what is 4 + 1 ?"] == "5"
    # 10 distinct prompts: 2 of them held out, and the two copies of "what is 3 + 1 ?" on one side
    assert len({r["prompt"].casefold() for r in val}) == 2
    sides = {"train" if r in train else "validation" for r in train + val if r["prompt"].casefold() == "what is 3 + 1 ?"}
    assert len(sides) == 1


def test_messages_column(tmp_path):
    task, data = load_user_generation_task(write_jsonl(tmp_path / "chat.jsonl", [chat(i) for i in range(10)]),
                                           messages_column="messages")
    assert task.text_column == "messages" and task.metric == "rougeL"
    assert data["train"].column_names == ["messages", "response"]
    row = (list(data["train"]) + list(data["validation"]))[0]
    assert row["messages"][0] == {"role": "system", "content": "be brief"} and len(row["messages"]) == 2
    assert row["response"] == str(int(row["messages"][1]["content"].split()[-1]) + 1)


def test_separate_validation_file(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", qa_rows(4))
    val = write_jsonl(tmp_path / "v.jsonl", [{"question": "what is 9 + 9 ?", "answer": "18"}])
    _, data = load_user_generation_task(train, "question", "answer", validation_path=val)
    assert (len(data["train"]), list(data["validation"]["response"])) == (4, ["18"])


@pytest.mark.parametrize("rows, kwargs, message", [
    (qa_rows(), {"prompt_column": "q", "response_column": "answer"},
     r"column 'q' not found in .*; available columns: question, answer \(name the right one with --prompt-column"),
    (qa_rows(), {"prompt_column": "question", "response_column": "a"}, "column 'a' not found.*--response-column"),
    (qa_rows(2) + [{"question": "x", "answer": "  "}], {"prompt_column": "question", "response_column": "answer"},
     "row 3 of .* has an empty response in column 'answer': fill it in or remove the row"),
    ([chat(0), {"messages": [{"role": "user", "content": "hi"}]}], {"messages_column": "messages"},
     "row 2 of .*: the last turn of column 'messages' is 'user', but it must be the assistant's response"),
    ([{"messages": [{"role": "assistant", "content": "hi"}]}], {"messages_column": "messages"},
     "holds only the response: add the user turn"),
    ([{"messages": [{"role": "robot", "content": "hi"}]}], {"messages_column": "messages"},
     "turn 1 of column 'messages' is not a"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}],
     {"messages_column": "messages"}, "empty assistant response"),
    (qa_rows(), {"messages_column": "chat"}, "column 'chat' not found.*--messages-column"),
    (qa_rows(), {"prompt_column": "question", "response_column": "answer", "metric": "accuracy"},
     "metric='accuracy' does not fit a generation task"),
])
def test_errors_name_the_fix(tmp_path, rows, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_user_generation_task(write_jsonl(tmp_path / "d.jsonl", rows), **kwargs)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match="data file not found"):
        load_user_generation_task(tmp_path / "none.jsonl")
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(ValueError, match="is empty: it has no data rows"):
        load_user_generation_task(tmp_path / "e.jsonl")
