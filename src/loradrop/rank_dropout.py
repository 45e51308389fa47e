"""DropLoRA's rank mask: a Bernoulli(1 - p) mask on the rank-r hidden ``h = A x``, in training only.

A forward hook on each ``lora_A`` multiplies its output by a fresh mask, so PEFT's LoRA layer stays
PEFT's (merging, saving and quantised bases keep working) and no parameter is added. A shared
``lora_A`` is called once per sharing site, so every site draws its own mask.

Masks come from torch's default generator of the tensor's device: ``torch.manual_seed`` (or
transformers' ``set_seed``) makes them reproducible, and gradient checkpointing, which saves and
restores that generator's state around a recomputed forward, replays the same masks. The draw
happens on the device, so there is no host sync, and only the r-dimensional hidden is touched, so
there is no copy of ``x``. loradrop's fast path (``fast_path``) applies the same mask inside its
fused LoRA function instead of calling the hook.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import RankDropoutConfig
from .sites import lora_layers

_ATTR = "_loradrop_rank_dropout"


def mask_shape(hidden: torch.Tensor, granularity: str) -> tuple[int, ...]:
    """The shape of one draw: every element (token), one r-vector per example (sample), or one
    r-vector for the whole forward (step)."""
    r = hidden.shape[-1]
    if granularity == "token":
        return tuple(hidden.shape)
    if granularity == "sample":
        return (hidden.shape[0],) + (1,) * (hidden.dim() - 2) + (r,)
    return (1,) * (hidden.dim() - 1) + (r,)


def mask_hidden(hidden: torch.Tensor, cfg: RankDropoutConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(masked, mask, scale): ``masked = hidden * mask * scale``, and the gradient of ``hidden`` is
    ``grad * mask * scale``. Token masks with rescaling are one fused dropout kernel (a boolean mask);
    the others are a drawn multiplicative mask (scale 1, rescaling folded in). The fast path masks
    through here too, so both paths consume the random stream identically."""
    if cfg.granularity == "token" and cfg.rescale:
        masked, keep = torch.native_dropout(hidden, cfg.p, True)
        return masked, keep, 1.0 / (1.0 - cfg.p)
    mask = torch.empty(mask_shape(hidden, cfg.granularity), device=hidden.device, dtype=hidden.dtype)
    mask.bernoulli_(1.0 - cfg.p)
    if cfg.rescale:
        mask.div_(1.0 - cfg.p)
    return hidden * mask, mask, 1.0


class _RankMask:
    """The forward hook on ``lora_A``: returns the masked hidden in training, nothing in eval."""

    def __init__(self, cfg: RankDropoutConfig):
        self.cfg = cfg

    def on(self, module: nn.Module) -> bool:
        return module.training and self.cfg.p > 0.0

    def __call__(self, module: nn.Module, args: tuple, hidden: torch.Tensor) -> torch.Tensor | None:
        return mask_hidden(hidden, self.cfg)[0] if self.on(module) else None


def add_rank_dropout(
    model: nn.Module,
    p: float | RankDropoutConfig = 0.5,
    granularity: str = "token",
    rescale: bool = True,
    adapter_name: str = "default",
) -> nn.Module:
    """Turns on DropLoRA's rank mask on every LoRA site of a PEFT model (plain, retained or shared
    LoRA); replaces an earlier rank mask. Returns the model."""
    cfg = p if isinstance(p, RankDropoutConfig) else RankDropoutConfig(p, granularity, rescale)
    layers = lora_layers(model)
    for name, layer in layers.items():  # check everything before changing anything
        if adapter_name not in layer.lora_A:
            raise ValueError(f"site {name!r} has no LoRA adapter named {adapter_name!r}")
        if layer.use_dora.get(adapter_name, False):
            raise ValueError(
                f"rank dropout on DoRA site {name!r} is not supported (the DropLoRA authors skip the mask "
                "with DoRA); use plain LoRA (use_dora=False) or rank_dropout=0"
            )
    remove_rank_dropout(model)
    handles, hooked = [], set()
    for layer in layers.values():
        lora_a = layer.lora_A[adapter_name]
        if id(lora_a) not in hooked:
            hooked.add(id(lora_a))
            handles.append(lora_a.register_forward_hook(_RankMask(cfg)))
    setattr(model, _ATTR, (cfg, handles))
    return model


def remove_rank_dropout(model: nn.Module) -> nn.Module:
    """Removes the rank mask, leaving a plain PEFT model. Returns the model."""
    state = getattr(model, _ATTR, None)
    if state is not None:
        for handle in state[1]:
            handle.remove()
        delattr(model, _ATTR)
    return model


def rank_dropout_of(model: nn.Module) -> RankDropoutConfig | None:
    """The rank mask that is on, if any."""
    state = getattr(model, _ATTR, None)
    return state[0] if state is not None else None
