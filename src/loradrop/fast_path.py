"""A faster forward for PEFT's ``lora.Linear``: the same numbers with less memory traffic and less
host work.

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as separate autograd ops. With
float32 adapters under bf16 autocast (the Trainer's mixed-precision setting) it first writes a
float32 copy of ``x``, and autocast writes a bf16 copy of that for ``lora_A``; the scaling multiply,
the addition and the sum of the two input gradients are each another pass over a ``d``-wide
activation, and every op is an autograd node the host has to schedule. The fast path is one autograd
function per site that:

* casts the adapter weights (r x d, tiny) to the compute dtype and never copies ``x`` -- with
  ``lora_dropout`` it draws the dropout on the activation as it comes (PEFT drops a float32 copy under
  autocast) and keeps the dropped ``x`` and the mask for the backward, as PEFT's bf16 path does;
* applies DropLoRA's rank mask and the scaling to the r-wide hidden ``h = A x``, writes the LoRA
  term ``h B^T`` first and lets the base GEMM add ``x W^T`` into it (beta = 1: cuBLAS reads the
  LoRA term in the epilogue of a compute-bound GEMM, where the read is nearly free), so no d-wide
  tensor is read back just to add the LoRA;
* in the backward does the same for the input gradient (``dh A`` written, ``dy W`` added by the
  big GEMM) and, without dropout, saves nothing d-wide but ``x``; the adapter gradients come back in
  the adapters' own dtype (on CUDA a float32 master gets the GEMM's float32 result without a bf16
  rounding), so float32 master weights accumulate float32 gradients (also across the sites of a
  shared LoRA).

With cuBLAS that leaves six skinny GEMMs a site, each one pass over a d-wide activation; measured
kernels written in Triton move those bytes no faster (``benchmarks/FASTPATH_NOTES.md``).

Rank masks come from ``rank_dropout.mask_hidden`` (the same random stream as the hook, so gradient
checkpointing replays them), and the importance probe's observer on ``lora_B`` is called with the
masked hidden, as on PEFT's path.

Wherever it does not apply -- merged or disabled adapters, several active adapters on a site, LoRA
variants (DoRA), quantised or Conv1D bases, a LoRA bias, mixed dtypes without autocast, or hooks it
does not know on the base, LoRA or dropout modules -- the layer runs PEFT's own forward. Enabling it
changes no parameter, state dict, saved adapter or merge.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear
from torch.nn.modules import module as _module

from .config import RankDropoutConfig
from .rank_dropout import _RankMask, mask_hidden

_OBSERVER = "_loradrop_observes_lora_input"


def observes_lora_input(hook: Callable) -> Callable:
    """Marks a forward hook on ``lora_B`` that only reads its input (the masked r-wide hidden) and
    returns nothing; the fast path calls such hooks as ``hook(lora_B, (h,), None)``."""
    setattr(hook, _OBSERVER, True)
    return hook


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _grad_mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` as the gradient of a parameter of ``dtype``. On CUDA a float32 master gets the GEMM's
    float32 accumulator directly: no rounding to bf16 first and no cast kernel."""
    if a.is_cuda and dtype == torch.float32 and a.dtype != dtype:
        return torch.mm(a, b, out_dtype=dtype)
    return _cast(a @ b, dtype)


def _input_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """PEFT's ``lora_dropout`` (an ``nn.Dropout``) on ``x``, drawn as ``F.dropout`` draws it on x's
    device -- the fused kernel on CUDA, a Bernoulli noise tensor on the CPU -- so both paths consume the
    random stream alike. Returns (dropped x, mask, scale) for ``_unmask``."""
    if x.is_cuda:
        dropped, keep = torch.native_dropout(x, p, True)
        return dropped, keep, 1.0 / (1.0 - p)
    noise = torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)
    return x * noise, noise, 1.0


def _unmask(grad: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``grad * mask * scale``, in one kernel where it can: the gradient through
    ``rank_dropout.mask_hidden`` (times the LoRA scaling) or ``_input_dropout``. ``grad`` is a fresh tensor."""
    if mask is None:
        return grad if scale == 1.0 else grad.mul_(scale)
    if mask.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(grad, mask, scale)
    masked = grad * mask
    return masked if scale == 1.0 else masked.mul_(scale)


class _LoraLinearFunction(torch.autograd.Function):
    """``x W^T + b + scaling * (mask * (x A^T)) B^T`` for 2-D ``x``, computed in ``dtype``: the
    LoRA term first, then the base GEMM accumulates into it.

    ``spec`` is (scaling, dtype, leading shape of x, rank-mask config or None, observers,
    lora_dropout probability)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, spec: tuple) -> torch.Tensor:
        scaling, dtype, lead, mask_cfg, observers, drop_p = spec
        w, a, b = _cast(weight, dtype), _cast(lora_a, dtype), _cast(lora_b, dtype)
        xd, drop_mask, ctx.drop_scale = _input_dropout(x, drop_p) if drop_p else (x, None, 1.0)
        h = F.linear(xd, a)
        mask, ctx.mask_scale = None, 1.0
        per_example = bool(observers) or (mask_cfg is not None and mask_cfg.granularity == "sample")
        if per_example:  # sample masks are drawn per example, the probe books per example and token
            h = h.view(*lead, -1)
        if mask_cfg is not None:  # token and step masks draw the same stream on the 2-D hidden
            h, mask, ctx.mask_scale = mask_hidden(h, mask_cfg)
        for observe in observers:
            observe(h)
        if per_example:
            h = h.reshape(-1, h.shape[-1])
        if scaling != 1.0:
            h = h * scaling  # r-wide: cheaper here than on the d-wide output
        y = F.linear(h, b, _cast(bias, dtype) if bias is not None else None)
        y.addmm_(x, w.t())  # the base GEMM reads the LoRA output as its C operand: no extra pass over y
        # the LoRA A gradient needs the dropped x; the undropped one only a trainable base weight
        x_base = x if drop_mask is not None and ctx.needs_input_grad[1] else None
        ctx.save_for_backward(xd, x_base, w, a, b, h, mask, drop_mask)
        ctx.spec = spec
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype, lora_a.dtype, lora_b.dtype)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple:
        xd, x, w, a, b, h, mask, drop_mask = ctx.saved_tensors
        scaling, lead = ctx.spec[0], ctx.spec[2]
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        weight_dtype, bias_dtype, a_dtype, b_dtype = ctx.dtypes
        dx = dw = dbias = da = db = None
        if need_b:
            db = _grad_mm(dy.t(), h, b_dtype)
        if need_x or need_a:
            dh = dy @ b
            if mask is not None and mask.dim() > 2:  # drawn per example
                dh = _unmask(dh.view(*lead, -1), mask, scaling * ctx.mask_scale).view(dh.shape)
            else:
                dh = _unmask(dh, mask, scaling * ctx.mask_scale)
            if need_a:
                da = _grad_mm(dh.t(), xd, a_dtype)
            if need_x:
                dx = dh @ a
                if drop_mask is not None:
                    dx = _unmask(dx, drop_mask, ctx.drop_scale)
                dx.addmm_(dy, w)  # as in the forward: the big GEMM adds the rank-r term in its epilogue
        if need_w:
            dw = _grad_mm(dy.t(), xd if x is None else x, weight_dtype)
        if need_bias:
            dbias = _cast(dy.sum(0), bias_dtype)
        return dx, dw, dbias, da, db, None


_PLAIN = (nn.Parameter, torch.Tensor)  # not a tensor subclass (quantised, DTensor, offloaded)


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward the fast path may skip: no subclass (quantised layers are),
    no patched forward (accelerate's offloading hooks), no module hooks, a plain floating weight.
    (Reads the module's ``__dict__``: this runs for every site in every forward.)"""
    if type(module) is not nn.Linear:
        return False
    weight = module.__dict__["_parameters"]["weight"]
    return not _patched(module) and type(weight) in _PLAIN and weight.is_floating_point()


def _patched(module: nn.Module) -> bool:
    """A replaced forward, or hooks other than forward hooks (those the callers look at themselves)."""
    state = module.__dict__
    return "forward" in state or bool(state["_forward_pre_hooks"] or state["_backward_hooks"]
                                      or state["_backward_pre_hooks"])


def _dropout_p(dropout: nn.Module, x: torch.Tensor) -> float | None:
    """The ``lora_dropout`` probability to apply (0.0: none), or None where the fast path cannot draw it
    as PEFT's module would: a hooked, replaced or other module than PEFT's ``nn.Dropout`` /
    ``nn.Identity``, an in-place dropout, p = 1, a device other than the CPU or CUDA."""
    if type(dropout) not in (nn.Dropout, nn.Identity) or _patched(dropout) or dropout._forward_hooks:
        return None
    if not dropout.training or type(dropout) is nn.Identity:
        return 0.0
    usable = not dropout.inplace and dropout.p < 1.0 and x.device.type in ("cpu", "cuda")
    return dropout.p if usable else None


def _global_hooks() -> bool:
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks
                or _module._global_backward_hooks or _module._global_backward_pre_hooks)


def _rank_mask(lora_a: nn.Module) -> RankDropoutConfig | None | bool:
    """The rank mask to draw (None: none), or False when ``lora_A`` has a hook the fast path does not know."""
    hooks = lora_a._forward_hooks
    if not hooks:
        return None
    hook = next(iter(hooks.values()))
    if len(hooks) > 1 or type(hook) is not _RankMask:
        return False
    return hook.cfg if hook.on(lora_a) else None


def _observers(lora_b: nn.Module) -> tuple[Callable, ...] | None:
    hooks = lora_b._forward_hooks
    if not hooks:
        return ()
    if not all(getattr(hook, _OBSERVER, False) for hook in hooks.values()):
        return None
    return tuple(lambda h, hook=hook: hook(lora_b, (h,), None) for hook in hooks.values())


def _fast_forward(self: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    call = None if args or kwargs else _fast_call(self, x)
    if call is None:
        return type(self).forward(self, x, *args, **kwargs)
    base, lora_a, lora_b, spec = call
    y = _LoraLinearFunction.apply(_cast(x.reshape(-1, x.shape[-1]), spec[1]), base.weight, base.bias, lora_a.weight,
                                  lora_b.weight, spec)
    return y.view(*spec[2], -1)


def _active_adapter(layer: LoraLinear) -> str | None:
    """The one active adapter of the layer that has a LoRA here (PEFT skips the others), else None."""
    state = layer.__dict__
    active, lora_a = state["_active_adapter"], state["_modules"]["lora_A"]
    names = [active] if isinstance(active, str) else active
    present = [name for name in names if name in lora_a._modules]
    return present[0] if len(present) == 1 else None


def _fast_call(layer: LoraLinear, x: torch.Tensor) -> tuple | None:
    """(base, lora_A, lora_B, spec) when the fast path computes exactly what PEFT's forward would,
    else None. Reads the layer's ``__dict__`` (PEFT's properties cost microseconds a site)."""
    state = layer.__dict__
    if state["_disable_adapters"] or state["merged_adapters"] or not x.is_floating_point():
        return None
    name = _active_adapter(layer)
    if name is None or name in state["lora_variant"]:
        return None
    modules = state["_modules"]
    base, lora_a, lora_b = modules["base_layer"], modules["lora_A"]._modules[name], modules["lora_B"]._modules[name]
    if not (_plain_linear(base) and not base._forward_hooks and _plain_linear(lora_a) and _plain_linear(lora_b)):
        return None
    if lora_b.bias is not None or _global_hooks():
        return None
    mask_cfg, observers = _rank_mask(lora_a), _observers(lora_b)
    if mask_cfg is False or observers is None:
        return None
    drop_p = _dropout_p(modules["lora_dropout"]._modules[name], x)
    if drop_p is None:
        return None
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    elif x.dtype == base.weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype:
        dtype = x.dtype
    else:
        return None  # PEFT would compute the LoRA in the adapter's dtype from a cast copy of x
    return base, lora_a, lora_b, (state["scaling"][name], dtype, tuple(x.shape[:-1]), mask_cfg, observers,
                                  drop_p)


def _lora_linears(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if type(m) is LoraLinear]


def _is_fast(layer: nn.Module) -> bool:
    return getattr(layer.__dict__.get("forward"), "__func__", None) is _fast_forward


def enable_fast_path(model: nn.Module) -> nn.Module:
    """Gives every PEFT ``lora.Linear`` of ``model`` the fast forward; each call falls back to PEFT's
    own where it does not apply. Layers whose forward someone else replaced are left alone.
    Returns the model."""
    for layer in _lora_linears(model):
        if "forward" not in layer.__dict__:
            layer.forward = MethodType(_fast_forward, layer)
    return model


def disable_fast_path(model: nn.Module) -> nn.Module:
    """Puts PEFT's forward back on every layer that has the fast one. Returns the model."""
    for layer in _lora_linears(model):
        if _is_fast(layer):
            del layer.forward
    return model


def fast_path_enabled(model: nn.Module) -> bool:
    """Whether any LoRA layer of ``model`` has the fast forward."""
    return any(_is_fast(layer) for layer in _lora_linears(model))
