import csv
import json
from pathlib import Path

import pytest

from loradrop.tasks.registry import dedup_key
from loradrop.tasks.user_data import load_user_task

SENTIMENT = [(f"review number {i}", "pos" if i % 3 else "neg") for i in range(30)]


def write_csv(path: Path, header: list[str], rows: list[tuple]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_csv_classification_with_string_labels(tmp_path):
    path = write_csv(tmp_path / "reviews.csv", ["sentence", "sentiment"], SENTIMENT)
    task, data = load_user_task(path, "sentence", "sentiment", validation_ratio=0.2, seed=0)
    assert (task.name, task.label_kind, task.metric, task.label_names) == ("reviews", "classification", "accuracy", ("neg", "pos"))
    assert task.source == f"{path} (text='sentence', label='sentiment')"
    assert (len(data["train"]), len(data["validation"])) == (24, 6)
    assert data["train"].column_names == ["text", "label"]
    by_text = dict(SENTIMENT)
    for row in data["train"]:
        assert task.label_names[row["label"]] == by_text[row["text"]]
    assert set(data["validation"]["label"]) == {0, 1}


def test_split_is_deterministic_and_keeps_duplicates_together(tmp_path):
    rows = SENTIMENT + [("REVIEW  number 4", "pos"), ("review number 7", "pos")]
    path = write_csv(tmp_path / "d.csv", ["text", "label"], rows)
    a, b, c = (load_user_task(path, "text", "label", validation_ratio=0.3, seed=s)[1] for s in (1, 1, 2))
    assert list(a["validation"]["text"]) == list(b["validation"]["text"]) != list(c["validation"]["text"])
    for data in (a, c):
        train = {dedup_key(t) for t in data["train"]["text"]}
        assert not train & {dedup_key(t) for t in data["validation"]["text"]}
        assert len(data["train"]) + len(data["validation"]) == 32


def test_jsonl_integer_labels_keep_their_ids_and_sort_numerically(tmp_path):
    rows = [{"q": f"question {i}", "a": f"answer {i}", "y": i % 11} for i in range(44)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    task, data = load_user_task(path, "q", "y", text_pair_column="a", validation_ratio=0.25)
    assert task.label_names == tuple(str(i) for i in range(11))
    assert task.text_pair_column == "text_pair"
    assert data["train"].column_names == ["text", "text_pair", "label"]
    for row in data["validation"]:
        assert row["text"].split()[1] == row["text_pair"].split()[1]
        assert row["label"] == int(row["text"].split()[1]) % 11


def test_regression_is_inferred_from_fractional_labels(tmp_path):
    rows = [{"text": f"pair {i}", "score": i / 4} for i in range(20)]
    task, data = load_user_task(write_jsonl(tmp_path / "sts.jsonl", rows), "text", "score")
    assert (task.label_kind, task.metric, task.label_names, task.num_labels) == ("regression", "spearman", (), 1)
    assert data["train"].features["label"].dtype == "float32"
    assert sorted(list(data["train"]["label"]) + list(data["validation"]["label"])) == [i / 4 for i in range(20)]


def test_whole_numbers_can_be_regression_when_asked(tmp_path):
    path = write_csv(tmp_path / "stars.csv", ["text", "stars"], [(f"t{i}", i % 5 + 1) for i in range(50)])
    assert load_user_task(path, "text", "stars")[0].label_names == ("1", "2", "3", "4", "5")
    assert load_user_task(path, "text", "stars", label_kind="regression")[0].label_kind == "regression"


def test_separate_validation_file_and_json_array(tmp_path):
    train = write_csv(tmp_path / "train.tsv", ["text", "label"], [])
    train.write_text("text\tlabel\ngood\tpos\nbad\tneg\nfine\tpos\n", encoding="utf-8")
    val = tmp_path / "dev.json"
    val.write_text(json.dumps([{"text": "awful", "label": "neg"}, {"text": "great", "label": "pos"}]))
    task, data = load_user_task(train, "text", "label", validation_path=val)
    assert list(data["train"]["text"]) == ["good", "bad", "fine"]
    assert list(data["validation"]["label"]) == [0, 1]


def test_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("\ufefftext,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(10)), encoding="utf-8")
    assert load_user_task(path, "text", "label", validation_ratio=0.2)[0].label_names == ("0", "1")


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="data file not found: .*nope.csv"):
        load_user_task(tmp_path / "nope.csv", "text", "label")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(ValueError, match=r"unsupported file type '\.xlsx' .*: use \.csv, \.tsv, \.jsonl, \.json"):
        load_user_task(path, "text", "label")


@pytest.mark.parametrize("name,content", [("empty.csv", ""), ("header.csv", "text,label\n"), ("blank.jsonl", "\n\n"), ("e.json", "[]")])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match="is empty: it has no data rows"):
        load_user_task(path, "text", "label")


def test_missing_column_lists_the_available_ones(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["sentence", "sentiment"], SENTIMENT)
    with pytest.raises(ValueError, match="column 'label' not found in .*d.csv; available columns: sentence, sentiment"):
        load_user_task(path, "sentence", "label")


def test_missing_value_names_the_row(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": None}])
    with pytest.raises(ValueError, match="row 2 of .* has no value in column 'label'"):
        load_user_task(path, "text", "label")


def test_only_one_class(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [(f"t{i}", "pos") for i in range(10)])
    with pytest.raises(ValueError, match="only one class \\('pos'\\) in column 'label'"):
        load_user_task(path, "text", "label")


def test_validation_label_not_in_training(tmp_path):
    train = write_csv(tmp_path / "train.csv", ["text", "label"], SENTIMENT)
    val = write_csv(tmp_path / "val.csv", ["text", "label"], [("meh", "pos"), ("so-so", "neutral")])
    with pytest.raises(ValueError, match="validation label 'neutral' \\(row 2 of .*val.csv\\) is not among the training labels: neg, pos"):
        load_user_task(train, "text", "label", validation_path=val)


def test_non_numeric_regression_label(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["text", "y"], [("a", "0.5"), ("b", "high")])
    with pytest.raises(ValueError, match="label 'high' in row 2 .* is not a finite number"):
        load_user_task(path, "text", "y", label_kind="regression")


def test_invalid_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    with pytest.raises(ValueError, match="line 2 of .* is not valid JSON"):
        load_user_task(path, "text", "label")


@pytest.mark.parametrize("kwargs,message", [({"validation_ratio": 1.0}, "validation_ratio=1.0 is invalid"),
                                            ({"label_kind": "ordinal"}, "label_kind='ordinal' is invalid")])
def test_invalid_arguments(tmp_path, kwargs, message):
    path = write_csv(tmp_path / "d.csv", ["text", "label"], SENTIMENT)
    with pytest.raises(ValueError, match=message):
        load_user_task(path, "text", "label", **kwargs)


def test_too_small_validation_part_is_explained(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["text", "label"], [(f"t{i}", "ab"[i % 2]) for i in range(10)])
    with pytest.raises(ValueError, match="a validation part of 1 of 10 distinct examples cannot hold all 2 classes"):
        load_user_task(path, "text", "label", validation_ratio=0.1)


def test_class_with_one_example_is_named(tmp_path):
    path = write_csv(tmp_path / "d.csv", ["text", "label"], SENTIMENT + [("odd one", "mixed")])
    with pytest.raises(ValueError, match="class 'mixed' has only one distinct example"):
        load_user_task(path, "text", "label")
