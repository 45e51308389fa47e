"""Issue 15, cases 5a and 6: long CSV fields, a missing (NaN) label, files that are not UTF-8."""

import csv

import pytest
from typer.testing import CliRunner

from loradrop.cli import app
from loradrop.tasks.user_data import load_user_task


def one_line(err, message):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err


def train_cli(tmp_path, data):
    return CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run"), "--data", str(data)])


# -- case 5a: long fields -----------------------------------------------------------------------------
def test_a_csv_field_over_pythons_default_limit_loads(tmp_path):
    long_text = "word " * 40_000  # 200,000 characters: over csv's 131,072
    rows = [(long_text if i == 3 else f"text {i}", i % 2) for i in range(40)]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])
    limit = csv.field_size_limit()
    task, data = load_user_task(tmp_path / "d.csv", "text", "label")
    assert csv.field_size_limit() == limit  # put back
    texts = list(data["train"]["text"]) + list(data["validation"]["text"])
    assert long_text in texts and task.label_names == ("0", "1")


# -- case 6: a missing label is not a regression target; files that are not UTF-8 ---------------------
@pytest.mark.parametrize("name,content,message", [
    ("d.csv", "text,label\na,0\nb,1\nc,nan\nd,1\n", "row 3 of {path} has a missing label ('nan') in column 'label'"),
    ("d.csv", "text,label\na,0\nb,1\nc,NaN\n", "row 3 of {path} has a missing label ('NaN')"),
    ("d.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": NaN}\n{"text": "c", "label": 1}\n',
     "row 2 of {path} has a missing label (nan)"),
    ("d.csv", "text,label\na,0\nb,inf\nc,1\n", "row 2 of {path} has the label 'inf' in column 'label': not a finite number"),
])
def test_a_nan_label_is_named_as_missing(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    message = message.format(path=path)
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)")):
        load_user_task(path, "text", "label")
    result = train_cli(tmp_path, path)
    assert result.exit_code == 2
    one_line(result.stderr, message)
    assert not (tmp_path / "run").exists()


def test_a_nan_label_in_the_validation_file(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\na,0\nb,1\nc,0\nd,1\n")
    (tmp_path / "v.csv").write_text("text,label\ne,1\nf,nan\n")
    with pytest.raises(ValueError, match="row 2 of .*v.csv has a missing label"):
        load_user_task(tmp_path / "t.csv", "text", "label", validation_path=tmp_path / "v.csv")


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl", "d.json"])
def test_a_file_that_is_not_utf8_is_named(tmp_path, name):
    text = {"d.csv": "text,label\ncaf\u00e9,0\nbar,1\n", "d.jsonl": '{"text": "caf\u00e9", "label": 0}\n',
            "d.json": '[{"text": "caf\u00e9", "label": 0}]'}[name]
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1"))
    message = f"{path} is not UTF-8 text (byte 0xe9 cannot be decoded): save it as UTF-8"
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        load_user_task(path, "text", "label")
    result = train_cli(tmp_path, path)
    assert result.exit_code == 2
    one_line(result.stderr, message)
    assert path.read_bytes() == text.encode("latin-1")
