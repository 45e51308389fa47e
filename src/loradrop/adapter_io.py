"""Adapters on disk: loradrop's compact format and export to the standard PEFT format.

PEFT's ``save_pretrained`` writes a shared LoRA once per sharing site (safetensors cannot store
aliased tensors, so PEFT clones them), which throws away LoRA-drop's storage saving. The compact
format stores every distinct tensor once: retained sites under PEFT's own key names, each shared
LoRA once under ``loradrop.shared.<module type>.lora_{A,B}.weight``. ``adapter_config.json`` holds
PEFT's fields plus a ``loradrop`` section (format version, config, plan, shared groups, rank
dropout and the base model's fingerprint) so a load can check what it is given.

``export_peft`` writes the shared weights out per site: what ``PeftModel.from_pretrained`` and
serving stacks load, with no loradrop import.

Every write goes to a temporary directory beside the target and is renamed into place at the end,
so a failure half way leaves the previous adapter as it was. Weights are read with safetensors
only; nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import LoraDropConfig, RankDropoutConfig
from .rank_dropout import add_rank_dropout, rank_dropout_of
from .selection import Plan
from .sharing import CONFIG_ATTR, PLAN_ATTR, restructure, shared_groups
from .sites import PEFT_PREFIX, find_sites, set_on_sites

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_SHARED_PREFIX = "loradrop.shared."
_FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "n_embd", "n_layer", "d_model", "num_layers")


# -- atomic directory writes ---------------------------------------------------------------------
@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary directory beside ``path`` that replaces ``path`` only when the block ends
    without an exception; otherwise it is removed and ``path`` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "adapter")
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old / "adapter", target)  # put the previous adapter back
                raise
            finally:
                shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


# -- what the model holds ------------------------------------------------------------------------
def _peft_model(model: nn.Module) -> PeftModel:
    if not isinstance(model, PeftModel):
        raise ValueError(f"expected a PEFT model (from loradrop.apply_plan or peft.get_peft_model), got {type(model).__name__}")
    return model


def _adapter(model: PeftModel) -> str:
    return model.active_adapter


def _base(model: PeftModel) -> nn.Module:
    return model.base_model.model


def fingerprint(base: nn.Module) -> dict[str, Any]:
    """What a load checks about the base model: its class and the config sizes that shape LoRA."""
    config = getattr(base, "config", None)
    values = config.to_dict() if config is not None else {}
    sizes = {k: values[k] for k in _FINGERPRINT_KEYS if k in values}
    if config is not None and hasattr(config, "num_labels"):
        sizes["num_labels"] = config.num_labels
    return {"architecture": type(base).__name__, **sizes}


def _site_key(site_name: str, part: str) -> str:
    """PEFT's key for a site's weight in a saved adapter (the adapter name is left out)."""
    return f"{site_name}.{part}.weight"


def _shared_key(module_type: str, part: str) -> str:
    return f"{_SHARED_PREFIX}{module_type}.{part}.weight"


def _compact_state(model: PeftModel) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """PEFT's adapter state with each shared LoRA once, and the sites of each shared group."""
    state = get_peft_model_state_dict(model, adapter_name=_adapter(model))
    groups = shared_groups(model, _adapter(model))
    for module_type, sites in groups.items():
        for part in ("lora_A", "lora_B"):
            state[_shared_key(module_type, part)] = state[_site_key(sites[0].name, part)]
            for site in sites:
                del state[_site_key(site.name, part)]
    state = {k: v.detach().contiguous() for k, v in state.items()}
    return state, {t: [s.name for s in sites] for t, sites in groups.items()}


def _loradrop_section(model: PeftModel, groups: dict[str, list[str]]) -> dict[str, Any]:
    cfg: LoraDropConfig | None = getattr(model, CONFIG_ATTR, None)
    plan: Plan | None = getattr(model, PLAN_ATTR, None)
    rank_dropout = rank_dropout_of(model)
    return {
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict() if cfg is not None else None,
        "plan": asdict(plan) if plan is not None else None,
        "shared": groups,
        "rank_dropout": asdict(rank_dropout) if rank_dropout is not None else None,
        "base_model": fingerprint(_base(model)),
    }


def _peft_fields(model: PeftModel) -> dict[str, Any]:
    fields = model.peft_config[_adapter(model)].to_dict()
    return json.loads(json.dumps(fields, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


# -- compact format ------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Writes the compact adapter: ``adapter_config.json`` and ``adapter_model.safetensors`` with
    every distinct tensor stored once. Atomic: the previous adapter at ``path`` survives a failure."""
    model = _peft_model(model)
    state, groups = _compact_state(model)
    config = {**_peft_fields(model), "loradrop": _loradrop_section(model, groups)}
    with atomic_directory(path) as tmp:
        _write_json(tmp / CONFIG_FILE, config)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "loradrop_format": str(FORMAT_VERSION)})
    return Path(path)


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The adapter's config with a checked ``loradrop`` section; a clear error for anything else."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"{path} is not an adapter directory: {CONFIG_FILE} is missing")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); the adapter is damaged, save it again") from None
    section = config.get("loradrop") if isinstance(config, dict) else None
    if not isinstance(section, dict):
        raise ValueError(
            f"{path} has no loradrop section in {CONFIG_FILE}: it is not a loradrop adapter "
            "(a plain PEFT adapter loads with peft.PeftModel.from_pretrained)"
        )
    version = section.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has loradrop format version {version!r}, this loradrop reads up to {FORMAT_VERSION}: "
            "upgrade loradrop to load it"
        )
    return config


def _plan_of(section: dict[str, Any], path: str | os.PathLike) -> Plan | None:
    data = section.get("plan", "missing")
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the loradrop plan is {'missing' if data == 'missing' else 'unreadable'}; save the adapter again")
    try:
        return Plan(**data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: the loradrop plan is unreadable ({err}); save the adapter again") from None


def _read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise ValueError(f"{path}: {WEIGHTS_FILE} is missing")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file} is truncated or corrupt ({err}); save the adapter again") from None


def _check_base(expected: dict[str, Any], base: nn.Module) -> None:
    actual = fingerprint(base)
    for key, value in expected.items():
        if actual.get(key) != value:
            raise ValueError(
                f"the adapter was trained on a base model with {key}={value!r}, this base model has "
                f"{key}={actual.get(key)!r}; load it onto the base model it was trained on"
            )


def _expand(weights: dict[str, torch.Tensor], shared: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """The compact tensors under PEFT's per-site key names."""
    full = {k: v for k, v in weights.items() if not k.startswith(_SHARED_PREFIX)}
    for module_type, site_names in shared.items():
        for part in ("lora_A", "lora_B"):
            key = _shared_key(module_type, part)
            if key not in weights:
                raise ValueError(f"the adapter's weights lack the shared LoRA {key!r}; the file is incomplete")
            for name in site_names:
                full[_site_key(name, part)] = weights[key]
    return full


def _check_keys_and_shapes(model: PeftModel, weights: dict[str, torch.Tensor], full: dict[str, torch.Tensor],
                           shared: dict[str, list[str]]) -> None:
    expected = get_peft_model_state_dict(model, adapter_name=_adapter(model))
    known = set(expected) | {_shared_key(t, p) for t in shared for p in ("lora_A", "lora_B")}
    missing = sorted(set(expected) - set(full))
    extra = sorted(set(weights) - known)
    if missing or extra:
        raise ValueError(
            f"the adapter's weights do not match the model: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"extra keys {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for key, value in full.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{key} has shape {tuple(value.shape)} in the adapter but {tuple(expected[key].shape)} in the model; "
                "the adapter belongs to another base model or LoRA rank"
            )


def _lora_config(fields: dict[str, Any]) -> LoraConfig:
    known = LoraConfig.__dataclass_fields__
    return LoraConfig(**{k: v for k, v in fields.items() if k in known and k not in ("peft_type", "loradrop")})


def load_adapter(base_model: nn.Module, path: str | os.PathLike) -> PeftModel:
    """Builds the saved model on ``base_model``: PEFT's LoRA as saved, the plan's shared ties and
    dropped sites, the saved weights, and the rank mask and fast-path setting the model was saved
    with. Nothing of training's setup is replayed (no re-initialisation, no config-driven rank mask);
    its outputs equal the saved model's, and training can continue from it."""
    config = read_adapter_config(path)
    section = config["loradrop"]
    _check_base(section.get("base_model") or {}, base_model)
    plan = _plan_of(section, path)
    weights = _read_weights(path)
    cfg = LoraDropConfig.from_dict(section["config"]) if section.get("config") else None
    model = get_peft_model(base_model, _lora_config(config))
    adapter = _adapter(model)
    if plan is not None:
        restructure(model, plan, adapter)
    if cfg is not None:
        setattr(model, CONFIG_ATTR, cfg)
        set_on_sites(model, fast_path=cfg.fast_path)
    shared = section.get("shared") or {}
    full = _expand(weights, shared)
    _check_keys_and_shapes(model, weights, full, shared)
    set_peft_model_state_dict(model, full, adapter_name=adapter)
    if section.get("rank_dropout"):
        add_rank_dropout(model, RankDropoutConfig(**section["rank_dropout"]), adapter_name=adapter)
    return model


def load_base_model(path: str | os.PathLike, base_model: str | os.PathLike | None = None) -> nn.Module:
    """The base model an adapter was trained on: from ``base_model`` (a local folder or hub id) or the
    folder recorded in the adapter, as the recorded transformers class with the recorded head size."""
    import transformers

    config = read_adapter_config(path)
    expected = config["loradrop"].get("base_model") or {}
    source = base_model or config.get("base_model_name_or_path")
    if not source:
        raise ValueError(f"{path} does not record its base model: pass the base model's folder or hub id")
    cls = getattr(transformers, expected.get("architecture", ""), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"the adapter's base model class {expected.get('architecture')!r} is not a transformers model class")
    kwargs = {"num_labels": expected["num_labels"]} if "num_labels" in expected else {}
    return cls.from_pretrained(source, **kwargs)


# -- standard PEFT format ------------------------------------------------------------------------
def _site_regex(model: PeftModel) -> str:
    names = [re.escape(s.name.removeprefix(PEFT_PREFIX)) for s in find_sites(model)]
    return "^(?:" + "|".join(names) + ")$"


def export_peft(model: nn.Module, path: str | os.PathLike) -> Path:
    """Writes a plain PEFT adapter directory (shared weights written out per site) that
    ``peft.PeftModel.from_pretrained`` and serving stacks load. Where a plan dropped sites, the
    exported ``target_modules`` names exactly the sites that have LoRA."""
    model = _peft_model(model)
    adapter = _adapter(model)
    plan: Plan | None = getattr(model, PLAN_ATTR, None)
    original = model.peft_config[adapter]
    exported = copy.deepcopy(original)
    if plan is not None and plan.others == "dropped":
        exported.target_modules = _site_regex(model)
    with atomic_directory(path) as tmp:
        model.peft_config[adapter] = exported
        try:
            model.save_pretrained(str(tmp), selected_adapters=[adapter])
        finally:
            model.peft_config[adapter] = original
        written = tmp / adapter if adapter != "default" else tmp
        if written != tmp:
            for item in written.iterdir():
                os.replace(item, tmp / item.name)
            written.rmdir()
    return Path(path)


# -- inspection ----------------------------------------------------------------------------------
def describe_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """What ``loradrop inspect`` prints: per module type the retained, shared and dropped layers,
    trainable parameters (each stored tensor once), bytes on disk and the plan."""
    config = read_adapter_config(path)
    section = config["loradrop"]
    plan = _plan_of(section, path)
    file = Path(path) / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file} is missing, truncated or corrupt ({err})") from None
    sites: dict[str, dict[str, list[int]]] = {}
    if plan is not None:
        for module_type, layers in plan.layers.items():
            roles = {"retained": [], "shared": [], "dropped": []}
            for layer in layers:
                roles[plan.role(module_type, layer)].append(layer)
            sites[module_type] = roles
    return {
        "path": str(path),
        "format_version": section["format_version"],
        "base_model": section.get("base_model"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        "sites": sites,
        "trainable_parameters": params,
        "bytes_on_disk": sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file()),
        "rank_dropout": section.get("rank_dropout"),
        "plan": section.get("plan"),
    }

