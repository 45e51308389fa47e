"""Configuration dataclasses, validated on construction.

A bad value fails here, with the field, the value and the allowed range, instead of deep inside
torch half way through a probe run.
"""

from __future__ import annotations

import math
from dataclasses import Field, asdict, dataclass, field, fields, replace
from typing import Any

PROBE_TOKENS = ("input", "response")
STRATEGIES = ("importance", "inverse", "inverse_share", "random", "top_k", "no_share")
GRANULARITIES = ("token", "sample", "step")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: {allowed}")


def _check_number(name: str, value: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    """Checks lo <(=) value <(=) hi, rejecting NaN, bools and non-numbers."""
    left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
    allowed = f"must be a number in {left}{lo}, {hi}{right}"
    if hi == math.inf:
        allowed = f"must be a finite number {'>' if lo_open else '>='} {lo}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        _fail(name, value, allowed)
    if (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi):
        _fail(name, value, allowed)


def _comma_list(name: str, value: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        _fail(name, value, "names nothing: give comma-separated names, e.g. q_proj,v_proj")
    return items


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        _fail(name, value, f"must be an integer >= {lo}")


@dataclass(frozen=True)
class RankDropoutConfig:
    """DropLoRA's rank-dimension mask: ``h = A x`` is multiplied by a Bernoulli(1 - p) mask in training.

    ``granularity`` says how many masks are drawn:

    * ``token`` -- an independent draw for every element of the (batch, seq, r) hidden, i.e. what
      ``nn.Dropout(p)`` between A and B does. This is what the DropLoRA authors' published code does
      (their PEFT fork, ``tuners/droplora/layer.py``: ``lora_B(inner_dropout(lora_A(dropout(x))))``
      with ``inner_dropout = nn.Dropout(p)``), so it is the default, with ``rescale=True``.
    * ``sample`` -- one mask of size r per example, as LyCORIS' ``rank_dropout`` and kohya's draw it.
    * ``step`` -- one mask of size r per site per training forward: the paper's text ("sampling
      different pruning matrices at each iteration step"). With gradient accumulation every
      micro-batch forward counts as a step.

    ``rescale`` divides kept ranks by 1 - p (inverted dropout) so the expected output is unchanged.
    """

    p: float = 0.5
    granularity: str = "token"
    rescale: bool = True

    def __post_init__(self) -> None:
        _check_number("rank_dropout", self.p, 0.0, 1.0, lo_open=False, hi_open=True)
        if self.granularity not in GRANULARITIES:
            _fail("rank_dropout_granularity", self.granularity, f"must be one of {', '.join(GRANULARITIES)}")
        if not isinstance(self.rescale, bool):
            _fail("rank_dropout_rescale", self.rescale, "must be True or False")


def _help(text: str, cli: bool = True) -> dict[str, Any]:
    """Field metadata: the help text of its CLI option (``cli=False``: not a CLI option)."""
    return {"help": text, "cli": cli}


@dataclass
class LoraDropConfig:
    """Everything a LoRA-drop run needs: the LoRA shape, the probe budget and the selection rule.

    The probe budget is counted in epochs over the alpha sample (``probe_epochs``, the paper uses 3),
    optionally capped at ``probe_max_steps`` optimizer steps for a quick run on a slow machine.
    Each field's ``help`` is also the help text of its ``loradrop train`` / ``importance`` option.
    """

    target_modules: list[str] | str | None = field(default=None, metadata=_help(
        "LoRA target modules, comma-separated (default by model type: query,value for BERT-style encoders, "
        "q,k,v,o,up,down projections for Llama-family decoders)"))
    r: int = field(default=8, metadata=_help("LoRA rank"))
    lora_alpha: float = field(default=16, metadata=_help("LoRA alpha (scaling = alpha / r)"))
    lora_dropout: float = field(default=0.0, metadata=_help("PEFT's dropout on the LoRA input"))
    threshold: float = field(default=0.9, metadata=_help("LoRA-drop's cumulative importance T per module type"))
    sample_ratio: float = field(default=0.1, metadata=_help("fraction alpha of the training data the probe uses"))
    probe_epochs: float = field(default=3.0, metadata=_help("probe training epochs over the sample"))
    probe_max_steps: int | None = field(default=None, metadata=_help("cap on probe optimizer steps"))
    probe_batch_size: int = field(default=16, metadata=_help("probe batch size per process"))
    probe_lr: float = field(default=1e-3, metadata=_help("probe learning rate"))
    probe_tokens: str = field(default="input", metadata=_help(
        "tokens whose LoRA output the probe sums: 'input' (every non-padding token, the paper) or 'response' "
        "(a causal LM's response tokens only, labels != -100)"))
    strategy: str = field(default="importance", metadata=_help(
        f"selection rule: {', '.join(STRATEGIES)}", cli=False))
    seed: int = field(default=0, metadata=_help("random seed (sample, probe, LoRA init, data order, masks)"))
    reinit: bool = field(default=True, metadata=_help("start every LoRA afresh after the probe"))
    rank_dropout: float = field(default=0.0, metadata=_help("DropLoRA's rank-mask probability p"))
    rank_dropout_granularity: str = field(default="token", metadata=_help(
        f"rank-mask draws: {', '.join(GRANULARITIES)} (token = the DropLoRA authors' code)"))
    rank_dropout_rescale: bool = field(default=True, metadata=_help("divide kept ranks by 1 - p"))
    fast_path: bool = field(default=True, metadata=_help("loradrop's fused LoRA forward (off: PEFT's own)"))
    task_type: str | None = field(default=None, metadata=_help("PEFT task type (default from the model class)", cli=False))
    modules_to_save: list[str] | None = field(default=None, metadata=_help("PEFT modules_to_save", cli=False))
    label_column: str | None = field(default=None, metadata=_help("column the probe sample is stratified by", cli=False))
    adapter_name: str = field(default="default", metadata=_help("PEFT adapter name", cli=False))
    extra_lora_kwargs: dict[str, Any] = field(default_factory=dict, metadata=_help("more LoraConfig fields", cli=False))

    def __post_init__(self) -> None:
        tm = self.target_modules
        if tm is None:
            pass
        elif isinstance(tm, str):
            if not tm:
                _fail("target_modules", tm, "must name at least one module, e.g. ['query', 'value']")
        elif not isinstance(tm, (list, tuple)) or not tm or not all(isinstance(t, str) and t for t in tm):
            _fail("target_modules", tm, "must be a non-empty list of module names, e.g. ['query', 'value']")
        else:
            self.target_modules = list(tm)
        _check_int("r", self.r, 1)
        _check_number("lora_alpha", self.lora_alpha, 0.0, math.inf, lo_open=True, hi_open=True)
        _check_number("lora_dropout", self.lora_dropout, 0.0, 1.0, lo_open=False, hi_open=True)
        _check_number("threshold", self.threshold, 0.0, 1.0, lo_open=True, hi_open=False)
        if self.probe_tokens not in PROBE_TOKENS:
            _fail("probe_tokens", self.probe_tokens, f"must be one of {', '.join(PROBE_TOKENS)}")
        _check_number("sample_ratio", self.sample_ratio, 0.0, 1.0, lo_open=True, hi_open=False)
        _check_number("probe_epochs", self.probe_epochs, 0.0, math.inf, lo_open=True, hi_open=True)
        if self.probe_max_steps is not None:
            _check_int("probe_max_steps", self.probe_max_steps, 1)
        _check_int("probe_batch_size", self.probe_batch_size, 1)
        _check_number("probe_lr", self.probe_lr, 0.0, math.inf, lo_open=True, hi_open=True)
        if self.strategy not in STRATEGIES:
            _fail("strategy", self.strategy, f"must be one of {', '.join(STRATEGIES)}")
        _check_int("seed", self.seed, 0)
        for name in ("reinit", "fast_path"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be True or False")
        self.rank_dropout_config  # validates the three rank_dropout fields

    @property
    def rank_dropout_config(self) -> RankDropoutConfig:
        return RankDropoutConfig(self.rank_dropout, self.rank_dropout_granularity, self.rank_dropout_rescale)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraDropConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LoraDropConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)


# method -> (selection strategy or None for plain LoRA, rank mask on)
METHODS: dict[str, tuple[str | None, bool]] = {
    "lora": (None, False),
    "lora-drop": ("importance", False),
    "droplora": (None, True),
    "lora-drop+droplora": ("importance", True),
    "inverse": ("inverse", False),
    "inverse-share": ("inverse_share", False),
    "random": ("random", False),
    "top-k": ("top_k", False),
    "no-share": ("no_share", False),
}
DTYPES = ("float32", "bfloat16", "float16", "auto")
TRUNCATION_POLICIES = ("drop", "truncate")
GENERATION_METRICS = ("exact_match", "choice_accuracy", "rougeL", "bleu", "chrf")


def run_lora_defaults() -> LoraDropConfig:
    """A run's LoRA-drop settings: the library's, with DropLoRA's p = 0.5 for the droplora methods."""
    return LoraDropConfig(rank_dropout=0.5)


@dataclass
class RunConfig:
    """What one ``loradrop train`` run does: the data, the model, the method, the training budget,
    and (``lora``) the LoRA-drop settings. ``task`` names a bundled task, or ``data`` points to a
    CSV/JSONL file with ``text_column`` / ``label_column`` (and ``text_pair_column``).

    ``method`` chooses the selection strategy and whether the rank mask is on; ``lora.rank_dropout``
    is the p the droplora methods use. Each field's ``help`` is its CLI option's help text.
    """

    output_dir: str = field(metadata=_help("run directory (rerun the same command to resume)"))
    method: str = field(default="lora-drop", metadata=_help(f"one of {', '.join(METHODS)}"))
    task: str = field(default="rotten-tomatoes", metadata=_help(
        "bundled task: rotten-tomatoes, tweet-sentiment, bbc-news; generation: gsm, bbc-headlines, review-sentiment"))
    data: str | None = field(default=None, metadata=_help("your own CSV/TSV/JSONL/JSON file instead of --task"))
    text_column: str = field(default="text", metadata=_help("column of the text in --data"))
    text_pair_column: str | None = field(default=None, metadata=_help("column of a pair's second text in --data"))
    label_column: str = field(default="label", metadata=_help("column of the label in --data"))
    model: str = field(default="minilm", metadata=_help("'minilm' (bundled) or a transformers model folder / hub id"))
    dtype: str = field(default="float32", metadata=_help(f"base weights' dtype: {', '.join(DTYPES)}"))
    epochs: float = field(default=3.0, metadata=_help("training epochs"))
    max_steps: int | None = field(default=None, metadata=_help("stop after this many steps"))
    batch_size: int = field(default=32, metadata=_help("batch size per process"))
    learning_rate: float = field(default=1e-3, metadata=_help("learning rate"))
    max_length: int = field(default=128, metadata=_help("tokens per example"))
    max_train_examples: int | None = field(default=None, metadata=_help("use at most this many training examples"))
    eval_steps: int | None = field(default=None, metadata=_help("evaluate every N steps (default: each epoch)"))
    prompt_column: str | None = field(default=None, metadata=_help(
        "column of the prompt in --data: makes it a generation task (with --response-column)"))
    response_column: str = field(default="response", metadata=_help("column of the response in --data"))
    messages_column: str | None = field(default=None, metadata=_help(
        "column of chat turns [{role, content}, ...] in --data, the last one the assistant's response"))
    generation_metric: str = field(default="rougeL", metadata=_help(
        f"metric of a generation task from --data: {', '.join(GENERATION_METRICS)}"))
    truncation: str = field(default="drop", metadata=_help(
        "examples longer than --max-length: 'drop' them or 'truncate' their response"))
    max_new_tokens: int = field(default=256, metadata=_help("cap on generated tokens per validation answer"))
    generation_eval_examples: int = field(default=50, metadata=_help(
        "validation examples answered by generation at each evaluation (greedy; slow on a CPU)"))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "recompute activations in backward (non-reentrant, so a shared LoRA's gradient is whole)"))
    liger: bool = field(default=True, metadata=_help(
        "Liger's kernels (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy) on a causal LM on CUDA, "
        "where liger-kernel supports its type"))
    show_progress: bool = field(default=True, metadata=_help("progress bars", cli=False))
    extra: dict[str, Any] = field(default_factory=dict, metadata=_help("more TrainingArguments", cli=False))
    lora: LoraDropConfig = field(default_factory=run_lora_defaults, metadata=_help("LoRA-drop settings", cli=False))

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraDropConfig.from_dict({**asdict(run_lora_defaults()), **self.lora})
        if not isinstance(self.lora, LoraDropConfig):
            _fail("lora", self.lora, "must be a LoraDropConfig")
        if self.method not in METHODS:
            _fail("method", self.method, f"must be one of {', '.join(METHODS)}")
        _check_number("epochs", self.epochs, 0.0, math.inf, lo_open=True, hi_open=True)
        _check_number("learning_rate", self.learning_rate, 0.0, math.inf, lo_open=True, hi_open=True)
        for name in ("max_steps", "max_train_examples", "eval_steps"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        for name in ("batch_size", "max_length"):
            _check_int(name, getattr(self, name), 1)
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"must be one of {', '.join(DTYPES)}")
        if self.truncation not in TRUNCATION_POLICIES:
            _fail("truncation", self.truncation, f"must be one of {', '.join(TRUNCATION_POLICIES)}")
        if self.generation_metric not in GENERATION_METRICS:
            _fail("generation_metric", self.generation_metric, f"must be one of {', '.join(GENERATION_METRICS)}")
        for name in ("max_new_tokens", "generation_eval_examples"):
            _check_int(name, getattr(self, name), 1)
        if self.prompt_column and self.messages_column:
            _fail("messages_column", self.messages_column, "give either prompt_column (with response_column) "
                  "or messages_column, not both")
        if METHODS[self.method][1] and self.lora.rank_dropout == 0.0:
            _fail("rank_dropout", 0.0, f"method {self.method!r} needs a rank-mask probability p > 0, e.g. 0.5")

    @property
    def seed(self) -> int:
        return self.lora.seed

    def loradrop_config(self) -> LoraDropConfig:
        """The LoRA-drop config the method stands for: its strategy (T = 1 for plain LoRA) and the
        rank mask on or off."""
        strategy, rank_mask = METHODS[self.method]
        return replace(self.lora, strategy=strategy or "importance",
                       threshold=self.lora.threshold if strategy else 1.0,
                       rank_dropout=self.lora.rank_dropout if rank_mask else 0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> RunConfig:
        """From flat options (the CLI's): LoraDropConfig's fields go into ``lora`` over the run's
        defaults (a name both configs have, ``label_column``, is the run's), ``target_modules`` may be
        one comma-separated string."""
        names = {f.name for f in fields(LoraDropConfig)} - set(cls.__dataclass_fields__)
        lora = {name: options.pop(name) for name in names if name in options}
        if isinstance(lora.get("target_modules"), str):
            lora["target_modules"] = _comma_list("target_modules", lora["target_modules"])
        return cls(**options, lora=replace(run_lora_defaults(), **lora))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """From ``to_dict``'s output (run_config.json); a clear error for unknown fields."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RunConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)


def cli_fields(cls: type) -> list[Field]:
    """The fields of a config dataclass that are command-line options."""
    return [f for f in fields(cls) if f.metadata.get("cli", False)]
