"""LoRA sites: the (layer, module type) units that LoRA-drop keeps or shares.

A site is one PEFT ``LoraLayer``. Its module type is the target-module name with the layer index
removed ("value" for ``...encoder.layer.7.attention.self.value``), lengthened only where the short
name would be ambiguous (T5's decoder has a ``q`` in both ``SelfAttention`` and ``EncDecAttention``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.error import NoMatchingPeftModuleError

from .config import LoraDropConfig
from .layer import as_loradrop_layer

PEFT_PREFIX = "base_model.model."

# model class name suffix -> PEFT task type; the task type makes PEFT train the task head too.
_TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}


# LoRA targets by model type when target_modules is None: the paper's query/value for encoders (its
# NLU setting) and q, k, v, o, up, down for Llama-family decoders (its NLG setting)
_LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS = {"bert": ["query", "value"], "roberta": ["query", "value"], "llama": _LLAMA_TARGETS,
                   "mistral": _LLAMA_TARGETS, "qwen2": _LLAMA_TARGETS, "qwen3": _LLAMA_TARGETS, "gpt2": ["c_attn"]}


@dataclass(frozen=True, order=True)
class Site:
    """One LoRA-wrapped module: its layer index, module type and full module name."""

    module_type: str
    layer: int
    name: str


def _split_on_layer_index(name: str) -> tuple[list[str], int, list[str]]:
    parts = name.removeprefix(PEFT_PREFIX).split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return parts[:i], int(part), parts[i + 1 :]
    raise ValueError(
        f"LoRA module {name!r} has no layer index in its name; LoRA-drop ranks the layers of a "
        "stack (e.g. encoder.layer.3.attention.self.query), so target modules inside numbered layers"
    )


def _module_types(names: list[str]) -> list[str]:
    """Shortest type names (trailing parts after the layer index, then the stack prefix) that make
    every (layer, type) pair unique."""
    split = [_split_on_layer_index(n) for n in names]
    longest = max(len(pre) + len(post) for pre, _, post in split)
    for k in range(1, longest + 1):
        types = []
        for pre, _, post in split:
            parts = post[-k:] if k <= len(post) else pre[len(post) - k :] + post
            types.append(".".join(parts))
        if len(Counter(zip(types, (layer for _, layer, _ in split)))) == len(names):
            return types
    return [".".join(pre + post) for pre, _, post in split]


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every PEFT LoRA layer of ``model`` by full module name, each given its LoRA-drop class
    (``layer.LoraDropLinear``) in place: the rank mask, the probe's observer and the fast path are
    attributes of that class."""
    return {name: as_loradrop_layer(m, name) for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def find_sites(model: nn.Module) -> list[Site]:
    """All LoRA sites of a PEFT model, sorted by module type then layer."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(
            "the model has no LoRA layers: wrap it with peft.get_peft_model (or let "
            "loradrop.evaluate_importance add LoRA) and check that target_modules name modules of the model"
        )
    names = list(layers)
    return sorted(Site(t, _split_on_layer_index(n)[1], n) for n, t in zip(names, _module_types(names)))


def sites_by_type(sites: list[Site]) -> dict[str, list[Site]]:
    grouped: dict[str, list[Site]] = {}
    for site in sites:
        grouped.setdefault(site.module_type, []).append(site)
    return grouped


def site_layers(sites: list[Site]) -> dict[str, list[int]]:
    """Per module type, the layers that have a site (a plan's ``layers``)."""
    return {t: sorted(s.layer for s in group) for t, group in sites_by_type(sites).items()}


def infer_task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    return next((t for suffix, t in _TASK_TYPES.items() if cls.endswith(suffix)), None)


def target_modules(cfg: LoraDropConfig, model: nn.Module) -> list[str] | str:
    """``cfg.target_modules``, or the default targets of the model's type when it is None."""
    if cfg.target_modules is not None:
        return cfg.target_modules
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    if model_type not in DEFAULT_TARGETS:
        raise ValueError(f"no default LoRA targets for model type {model_type!r}: set target_modules, e.g. ['q_proj', 'v_proj']")
    return DEFAULT_TARGETS[model_type]


def lora_config(cfg: LoraDropConfig, model: nn.Module) -> LoraConfig:
    """The PEFT LoraConfig that a LoRA-drop config stands for."""
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules(cfg, model),
        task_type=cfg.task_type or infer_task_type(model),
        modules_to_save=cfg.modules_to_save,
        **cfg.extra_lora_kwargs,
    )


def add_lora(model: nn.Module, cfg: LoraDropConfig) -> PeftModel:
    """Wraps a transformers model with PEFT LoRA as ``cfg`` says, every site a ``LoraDropLinear``
    with ``cfg.fast_path``; a clear error when the target modules match nothing."""
    try:
        peft_model = get_peft_model(model, lora_config(cfg, model))
    except NoMatchingPeftModuleError:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if not list(m.children()) and getattr(m, "weight", None) is not None and m.weight.dim() == 2})
        raise ValueError(
            f"target_modules={cfg.target_modules!r} match no module of {type(model).__name__}; "
            f"its layers with a weight matrix are named {leaves}"
        ) from None
    return set_on_sites(peft_model, fast_path=cfg.fast_path)


def set_on_sites(model: nn.Module, **settings: object) -> nn.Module:
    """Sets ``LoraDropLinear`` attributes (``fast_path``, ``rank_dropout``) on every LoRA site."""
    for layer in lora_layers(model).values():
        for name, value in settings.items():
            setattr(layer, name, value)
    return model


def enable_fast_path(model: nn.Module) -> nn.Module:
    """Gives every LoRA site of a PEFT model loradrop's fused forward (each call falls back to PEFT's
    own where it does not apply). Returns the model."""
    return set_on_sites(model, fast_path=True)


def disable_fast_path(model: nn.Module) -> nn.Module:
    """Every LoRA site runs PEFT's own forward. Returns the model."""
    return set_on_sites(model, fast_path=False)


def fast_path_enabled(model: nn.Module) -> bool:
    """Whether any LoRA site of ``model`` has the fused forward on."""
    return any(layer.fast_path for layer in lora_layers(model).values())
