"""Configuration dataclasses, validated on construction.

A bad value fails here, with the field, the value and the allowed range, instead of deep inside
torch half way through a probe run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

STRATEGIES = ("importance", "inverse", "random", "top_k", "no_share")
GRANULARITIES = ("token", "sample", "step")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: {allowed}")


def _check_number(name: str, value: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    """Checks lo <(=) value <(=) hi, rejecting NaN, bools and non-numbers."""
    left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
    allowed = f"must be a number in {left}{lo}, {hi}{right}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        _fail(name, value, allowed)
    if (value <= lo if lo_open else value < lo) or (value >= hi if hi_open else value > hi):
        _fail(name, value, allowed)


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


@dataclass
class LoraDropConfig:
    """Everything a LoRA-drop run needs: the LoRA shape, the probe budget and the selection rule.

    The probe budget is counted in epochs over the alpha sample (``probe_epochs``, the paper uses 3),
    optionally capped at ``probe_max_steps`` optimizer steps for a quick run on a slow machine.
    """

    target_modules: list[str] | str
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    threshold: float = 0.9
    sample_ratio: float = 0.1
    probe_epochs: float = 3.0
    probe_max_steps: int | None = None
    probe_batch_size: int = 16
    probe_lr: float = 1e-3
    strategy: str = "importance"
    seed: int = 0
    reinit: bool = True
    rank_dropout: float = 0.0
    rank_dropout_granularity: str = "token"
    rank_dropout_rescale: bool = True
    fast_path: bool = True
    task_type: str | None = None
    modules_to_save: list[str] | None = None
    label_column: str | None = None
    adapter_name: str = "default"
    extra_lora_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tm = self.target_modules
        if isinstance(tm, str):
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
