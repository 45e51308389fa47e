"""LoRA-drop's second stage: apply a plan to a PEFT LoRA model.

Per module type, the retained layers keep their own LoRA. Every other site of that type gets the
very same ``lora_A`` and ``lora_B`` ``nn.Linear`` objects (``shared``) -- so the optimizer sees one
set of parameters and the gradients of all sharing sites add up in it -- or loses its LoRA layer
altogether (``dropped``, the paper's w/o-share ablation).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper
from torch.distributed.fsdp import FSDPModule

from .config import LoraDropConfig
from .probe import ImportanceResult
from .rank_dropout import add_rank_dropout
from .selection import Plan
from .sites import Site, add_lora, disable_fast_path, enable_fast_path, find_sites, lora_layers, site_layers, sites_by_type

PLAN_ATTR = "loradrop_plan"
CONFIG_ATTR = "loradrop_config"


def _check_plan_matches(plan: Plan, sites: list[Site]) -> None:
    found = site_layers(sites)
    if found != plan.layers:
        raise ValueError(
            f"the plan is for sites {plan.layers} but the model has LoRA sites {found}; "
            "use the plan made for this model and these target_modules"
        )


def _reinit(model: PeftModel, cfg: LoraDropConfig) -> None:
    """Fresh PEFT initialisation (A Kaiming-uniform, B zero) of every LoRA and fresh copies of the
    trained heads, drawn from ``cfg.seed`` without touching the global random state."""
    device = next(model.parameters()).device
    init = cfg.extra_lora_kwargs.get("init_lora_weights", True)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        for layer in lora_layers(model).values():
            layer.reset_lora_parameters(cfg.adapter_name, init)
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper) and cfg.adapter_name in module.modules_to_save:
            module.modules_to_save[cfg.adapter_name].load_state_dict(module.original_module.state_dict())


def _drop(model: nn.Module, site: Site) -> None:
    layer = lora_layers(model)[site.name]
    parent, _, child = site.name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer.get_base_layer())


def _share(model: nn.Module, sites: list[Site], adapter: str) -> None:
    layers = lora_layers(model)
    first = layers[sites[0].name]
    shared_a, shared_b = first.lora_A[adapter], first.lora_B[adapter]
    for site in sites[1:]:
        layer = layers[site.name]
        for mine, shared in ((layer.lora_A[adapter], shared_a), (layer.lora_B[adapter], shared_b)):
            if mine.weight.shape != shared.weight.shape:
                raise ValueError(
                    f"cannot share one LoRA between {sites[0].name!r} and {site.name!r}: their LoRA "
                    f"weights have shapes {tuple(shared.weight.shape)} and {tuple(mine.weight.shape)}"
                )
        layer.lora_A[adapter] = shared_a
        layer.lora_B[adapter] = shared_b


def restructure(model: PeftModel, plan: Plan, adapter_name: str = "default") -> PeftModel:
    """Gives ``model`` the structure ``plan`` describes: per module type one LoRA shared by every
    non-retained site (or no LoRA there, for a ``dropped`` plan). Weights are not touched: a shared
    LoRA is the lowest sharing layer's. ``load_adapter`` builds a saved model with this alone."""
    sites = find_sites(model)
    _check_plan_matches(plan, sites)
    for module_type, group in sites_by_type(sites).items():
        others = [s for s in group if plan.role(module_type, s.layer) != "retained"]
        if not others:
            continue
        if plan.others == "dropped":
            for site in others:
                _drop(model, site)
        else:
            _share(model, others, adapter_name)
    setattr(model, PLAN_ATTR, plan)
    return model


def apply_plan(model: nn.Module, plan: Plan | ImportanceResult, cfg: LoraDropConfig) -> PeftModel:
    """Applies ``plan`` and returns the PEFT model to fine-tune.

    ``model`` is the PEFT model the probe trained, or a plain transformers model that gets LoRA as
    ``cfg`` says. With ``cfg.reinit`` every LoRA starts afresh as PEFT initialises it; without it,
    retained sites keep the probe's weights and a shared LoRA starts from its lowest layer's.
    ``cfg.rank_dropout > 0`` turns on DropLoRA's rank mask on every remaining site, and
    ``cfg.fast_path`` loradrop's fused LoRA forward (same numbers as PEFT's, less memory traffic).
    """
    if isinstance(model, FSDPModule):
        raise ValueError(
            f"{type(model).__name__} is already sharded by FSDP, and a plan cannot tie LoRAs across shard groups: "
            "apply the plan to an unsharded model, then shard it with loradrop.shard_model"
        )
    result = plan if isinstance(plan, ImportanceResult) else None
    plan = result.plan if result is not None else plan
    if not isinstance(plan, Plan):
        raise ValueError(f"plan must be a loradrop Plan or ImportanceResult, got {type(plan).__name__}")
    peft_model = model if isinstance(model, PeftModel) else add_lora(model, cfg)
    _check_plan_matches(plan, find_sites(peft_model))
    if cfg.reinit:
        _reinit(peft_model, cfg)
    elif result is not None and result.lora_state is not None and not isinstance(model, PeftModel):
        params = dict(peft_model.named_parameters())
        with torch.no_grad():
            for name, value in result.lora_state.items():
                params[name].copy_(value)
    restructure(peft_model, plan, cfg.adapter_name)
    if cfg.rank_dropout > 0:
        add_rank_dropout(peft_model, cfg.rank_dropout_config, adapter_name=cfg.adapter_name)
    (enable_fast_path if cfg.fast_path else disable_fast_path)(peft_model)
    setattr(peft_model, CONFIG_ATTR, cfg)
    return peft_model


def shared_groups(model: nn.Module, adapter: str = "default") -> dict[str, list[Site]]:
    """Per module type, the sites whose ``lora_A`` is the same object as another site's."""
    layers = lora_layers(model)
    groups: dict[str, list[Site]] = {}
    for module_type, group in sites_by_type(find_sites(model)).items():
        owners: dict[int, list[Site]] = {}
        for site in group:
            owners.setdefault(id(layers[site.name].lora_A[adapter]), []).append(site)
        for members in owners.values():
            if len(members) > 1:
                groups[module_type] = members
    return groups


def lora_parameter_count(model: nn.Module) -> int:
    """Trainable LoRA parameters, each shared tensor counted once (as the optimizer sees them)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n)


def summary_rows(model: nn.Module) -> list[dict[str, Any]]:
    """One row per site of the plan: layer, type, retained/shared/dropped, importance."""
    plan: Plan | None = getattr(model, PLAN_ATTR, None)
    if plan is None:
        return [
            {"type": s.module_type, "layer": s.layer, "role": "retained", "importance": None}
            for s in find_sites(model)
        ]
    rows = []
    for module_type, layers in plan.layers.items():
        scores = plan.importance[module_type] if plan.importance else [None] * len(layers)
        for layer, score in zip(layers, scores):
            rows.append({"type": module_type, "layer": layer, "role": plan.role(module_type, layer), "importance": score})
    return rows


def summary(model: nn.Module) -> str:
    """A plain-text table of the model's LoRA sites and what the plan did with each."""
    rows = summary_rows(model)
    lines = [f"{'type':<16} {'layer':>5}  {'role':<9} {'importance':>10}"]
    for row in rows:
        score = "" if row["importance"] is None else f"{row['importance']:.4f}"
        lines.append(f"{row['type']:<16} {row['layer']:>5}  {row['role']:<9} {score:>10}")
    counts = {role: sum(r["role"] == role for r in rows) for role in ("retained", "shared", "dropped")}
    lines.append(
        f"{len(rows)} sites: {counts['retained']} retained, {counts['shared']} shared, {counts['dropped']} dropped; "
        f"{lora_parameter_count(model):,} trainable LoRA parameters"
    )
    return "\n".join(lines)
