"""``LoraDropLinear``: PEFT's ``lora.Linear`` with LoRA-drop's three additions as ordinary attributes.

* ``rank_dropout`` -- DropLoRA's rank mask: in training, the rank-r hidden ``h = A x`` is multiplied
  by a Bernoulli(1 - p) mask (``RankDropoutConfig`` says how many draws); ``None`` is off.
* ``observer`` -- a callable that is given the (masked) hidden ``h`` of every forward: the slot the
  importance probe books ``||Delta W x||^2`` through; ``None`` is off.
* ``fast_path`` -- one fused autograd function per site instead of PEFT's separate ops (below).

Every LoRA site of a model wrapped by loradrop is one of these (``sites.add_lora`` swaps the class of
each ``lora.Linear`` in place: same parameters, same names, same state dict, so saving, merging and a
PEFT export stay PEFT's). This module is the only one that reads PEFT or torch internals, and it
reads them defensively: anything it cannot read makes the call take PEFT's own forward, never raise.

The fast path. PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` as separate autograd
ops; under bf16 autocast with float32 adapters it writes a float32 copy of ``x`` and a bf16 copy of
that; the scaling, the addition and the sum of the two input gradients are each another pass over a
``d``-wide activation. ``_LoraLinearFunction`` instead casts only the r x d adapter weights, applies
the rank mask and scaling on the r-wide hidden, writes the LoRA term ``h B^T`` first and lets the
base GEMM add ``x W^T`` into it (cuBLAS reads it in the epilogue of a compute-bound GEMM), does the
same for the input gradient, and hands float32 masters float32 gradients (on CUDA straight from the
GEMM). Measured design notes: ``benchmarks/FASTPATH_NOTES.md``.

Where the fast path does not apply -- merged or disabled adapters, several active adapters, LoRA
variants (DoRA), non-``nn.Linear`` bases (quantised, Conv1D), a LoRA bias, mixed dtypes without
autocast, hooks on the base or LoRA modules, extra forward arguments, an untested torch or PEFT --
the layer calls ``super().forward``; the rank mask and the observer then sit in a forward pre-hook
on ``lora_B`` for the duration of that one call.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import peft
import torch
import torch.nn as nn
import torch.nn.functional as F
from packaging.version import Version
from peft.tuners import lora
from peft.tuners.lora import LoraLayer
from torch.nn.modules import module as torch_module

from .config import RankDropoutConfig

Observer = Callable[[torch.Tensor], None]

# The fast path is used only on the versions the tests cover; elsewhere every call is PEFT's forward.
# torch.mm(..., out_dtype=) (float32 gradients from bf16 GEMMs) needs torch 2.8.
TESTED_TORCH = (Version("2.8"), Version("2.14"))
TESTED_PEFT = (Version("0.21"), Version("0.22"))


def _in_range(version: str, bounds: tuple[Version, Version]) -> bool:
    return bounds[0] <= Version(Version(version).base_version) < bounds[1]


FAST_PATH_SUPPORTED = _in_range(torch.__version__, TESTED_TORCH) and _in_range(peft.__version__, TESTED_PEFT)


# -- the rank mask ---------------------------------------------------------------------------------
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
    """(masked, mask, scale): ``masked = hidden * mask * scale``. Token masks with rescaling are one
    fused dropout kernel (a boolean mask, as ``nn.Dropout`` draws it); the others are a drawn
    multiplicative mask with the rescaling folded in. Both paths of the layer draw through here, from
    torch's default generator, so ``manual_seed`` reproduces the masks and gradient checkpointing
    replays them."""
    if cfg.granularity == "token" and cfg.rescale:
        masked, keep = torch.native_dropout(hidden, cfg.p, True)
        return masked, keep, 1.0 / (1.0 - cfg.p)
    mask = torch.empty(mask_shape(hidden, cfg.granularity), device=hidden.device, dtype=hidden.dtype)
    mask.bernoulli_(1.0 - cfg.p)
    if cfg.rescale:
        mask.div_(1.0 - cfg.p)
    return hidden * mask, mask, 1.0


# -- the fused function ----------------------------------------------------------------------------
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
    """``grad * mask * scale`` in one kernel where it can: the gradient through ``mask_hidden``
    (times the LoRA scaling) or ``_input_dropout``. ``grad`` is a fresh tensor."""
    if mask is None:
        return grad if scale == 1.0 else grad.mul_(scale)
    if mask.dtype == torch.bool:
        return torch.ops.aten.native_dropout_backward(grad, mask, scale)
    masked = grad * mask
    return masked if scale == 1.0 else masked.mul_(scale)


class _LoraLinearFunction(torch.autograd.Function):
    """``x W^T + b + scaling * (mask * (x A^T)) B^T`` for 2-D ``x``, computed in ``dtype``: the
    LoRA term first, then the base GEMM accumulates into it.

    ``spec`` is (scaling, dtype, leading shape of x, rank-mask config or None, observer or None,
    lora_dropout probability)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, spec: tuple) -> torch.Tensor:
        scaling, dtype, lead, mask_cfg, observer, drop_p = spec
        w, a, b = _cast(weight, dtype), _cast(lora_a, dtype), _cast(lora_b, dtype)
        xd, drop_mask, ctx.drop_scale = _input_dropout(x, drop_p) if drop_p else (x, None, 1.0)
        h = F.linear(xd, a)
        mask, ctx.mask_scale = None, 1.0
        per_example = observer is not None or (mask_cfg is not None and mask_cfg.granularity == "sample")
        if per_example:  # sample masks are drawn per example, the probe books per example and token
            h = h.view(*lead, -1)
        if mask_cfg is not None:  # token and step masks draw the same stream on the 2-D hidden
            h, mask, ctx.mask_scale = mask_hidden(h, mask_cfg)
        if observer is not None:
            observer(h)
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


# -- what the fast path may skip -------------------------------------------------------------------
# These checks run for every site in every forward; on a GPU fast enough to wait for the host (a 7B
# step with Liger's kernels) their Python is part of the step time, hence explicit or-chains.
_PLAIN = (nn.Parameter, torch.Tensor)  # not a tensor subclass (quantised, DTensor, offloaded)


def _unhooked(module: nn.Module) -> bool:
    """No replaced forward and no hooks of any kind (accelerate's offloading patches ``forward``)."""
    state = module.__dict__
    return not ("forward" in state or state["_forward_hooks"] or state["_forward_pre_hooks"]
                or state["_backward_hooks"] or state["_backward_pre_hooks"])


def _plain_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight of an ``nn.Linear`` whose forward the fast path may replace by its own GEMM: exactly
    that class (quantised layers are subclasses), unhooked, with a plain floating weight; else None."""
    if type(module) is not nn.Linear or not _unhooked(module):
        return None
    weight = module.__dict__["_parameters"]["weight"]
    return weight if type(weight) in _PLAIN and weight.is_floating_point() else None


def _global_hooks() -> bool:
    """Module hooks registered for every module (torch keeps them in private globals); when they
    cannot be read, assume there are some."""
    try:
        return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                    or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)
    except AttributeError:
        return True


def _dropout_p(dropout: nn.Module, x: torch.Tensor) -> float | None:
    """The ``lora_dropout`` probability to apply (0.0: none), or None where the fast path cannot draw it
    as PEFT's module would: a hooked or other module than ``nn.Dropout`` / ``nn.Identity``, an in-place
    dropout, p = 1, a device other than the CPU or CUDA."""
    if type(dropout) not in (nn.Dropout, nn.Identity) or not _unhooked(dropout):
        return None
    if not dropout.training or type(dropout) is nn.Identity:
        return 0.0
    usable = not dropout.inplace and dropout.p < 1.0 and x.device.type in ("cpu", "cuda")
    return dropout.p if usable else None


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.dtype | None:
    """Autocast's dtype, or the one dtype of x and the weights; None where PEFT would compute the
    LoRA in the adapter's dtype from a cast copy of x (mixed dtypes without autocast)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    dtype = x.dtype
    return dtype if weight.dtype == dtype and a.dtype == dtype and b.dtype == dtype else None


# -- the layer -------------------------------------------------------------------------------------
class _LoraDropLayer:
    """LoRA-drop's additions to a PEFT LoRA layer class (see the module docstring)."""

    rank_dropout: RankDropoutConfig | None = None
    observer: Observer | None = None
    fast_path: bool = True

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        spec = None if args or kwargs else self._fast_spec(x)
        if spec is None:
            return self._peft_forward(x, *args, **kwargs)
        weight, bias, lora_a, lora_b, spec = spec
        y = _LoraLinearFunction.apply(_cast(x.reshape(-1, x.shape[-1]), spec[1]), weight, bias, lora_a, lora_b, spec)
        return y.view(*spec[2], -1)

    def _active_mask(self) -> RankDropoutConfig | None:
        cfg = self.rank_dropout
        return cfg if cfg is not None and self.training and cfg.p > 0.0 else None

    def _fast_spec(self, x: torch.Tensor) -> tuple | None:
        """(base weight, base bias, lora_A weight, lora_B weight, spec) when the fast path computes
        exactly what PEFT's forward would, else None -- also when a PEFT internal it reads is missing."""
        if not (FAST_PATH_SUPPORTED and self.fast_path and x.is_floating_point()):
            return None
        try:
            return self._read_fast_spec(x)
        except (AttributeError, KeyError, TypeError):
            return None

    def _read_fast_spec(self, x: torch.Tensor) -> tuple | None:
        # PEFT's state through __dict__: its properties cost microseconds a site, and every forward reads them
        state = self.__dict__
        if state["_disable_adapters"] or state["merged_adapters"]:
            return None
        name = self._single_active_adapter()
        if name is None or name in state["lora_variant"]:
            return None
        modules = state["_modules"]
        base, lora_b = modules["base_layer"], modules["lora_B"]._modules[name]
        weight, a, b = _plain_weight(base), _plain_weight(modules["lora_A"]._modules[name]), _plain_weight(lora_b)
        if weight is None or a is None or b is None or lora_b.__dict__["_parameters"]["bias"] is not None:
            return None
        if _global_hooks():
            return None
        drop_p = _dropout_p(modules["lora_dropout"]._modules[name], x)
        dtype = _compute_dtype(x, weight, a, b)
        if drop_p is None or dtype is None:
            return None
        spec = (float(state["scaling"][name]), dtype, tuple(x.shape[:-1]), self._active_mask(), self.observer, drop_p)
        return weight, base.__dict__["_parameters"]["bias"], a, b, spec

    def _single_active_adapter(self) -> str | None:
        """The one active adapter that has a LoRA here (PEFT skips the others), else None."""
        state = self.__dict__
        active, present = state["_active_adapter"], state["_modules"]["lora_A"]._modules
        if isinstance(active, str):
            return active if active in present else None
        names = [name for name in active if name in present]
        return names[0] if len(names) == 1 else None

    def _peft_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        mask, observer = self._active_mask(), self.observer
        if mask is None and observer is None:
            return super().forward(x, *args, **kwargs)
        with self._between_a_and_b(mask, observer):
            return super().forward(x, *args, **kwargs)

    @contextmanager
    def _between_a_and_b(self, mask: RankDropoutConfig | None, observer: Observer | None):
        """For one call of PEFT's forward: the rank mask, then the observer, on the input of each
        ``lora_B`` (a shared ``lora_B`` is hooked by one site at a time)."""
        def hook(module: nn.Module, args: tuple) -> tuple:
            hidden = args[0]
            if mask is not None:
                hidden = mask_hidden(hidden, mask)[0]
            if observer is not None:
                observer(hidden)
            return (hidden,) + args[1:]

        handles = [self.lora_B[name].register_forward_pre_hook(hook) for name in self.active_adapters
                   if name in self.lora_B]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class LoraDropLinear(_LoraDropLayer, lora.Linear):
    """PEFT's ``lora.Linear`` with DropLoRA's rank mask, the probe's observer slot and the fast path."""


def _bnb_classes() -> dict[type, type]:
    """LoRA-drop layers for PEFT's bitsandbytes LoRA layers (QLoRA), where bitsandbytes is installed.
    Defined at module level so that pickled models find them by name."""
    try:
        from peft.tuners.lora import bnb
    except ImportError:
        return {}
    classes = {}
    for name in ("Linear8bitLt", "Linear4bit"):
        peft_cls = getattr(bnb, name, None)
        if peft_cls is not None:
            cls = type(f"LoraDrop{name}", (_LoraDropLayer, peft_cls), {"__module__": __name__, "__doc__": (
                f"PEFT's bitsandbytes ``{name}`` LoRA layer with the rank mask and the observer slot (PEFT's forward).")})
            globals()[cls.__name__] = cls
            classes[peft_cls] = cls
    return classes


LORADROP_CLASSES: dict[type, type] = {lora.Linear: LoraDropLinear, **_bnb_classes()}


def as_loradrop_layer(layer: LoraLayer, name: str) -> _LoraDropLayer:
    """Gives a PEFT LoRA layer its LoRA-drop class in place (parameters, buffers and state dict are
    untouched); a clear error for LoRA layer types loradrop does not cover."""
    if isinstance(layer, _LoraDropLayer):
        return layer
    cls = LORADROP_CLASSES.get(type(layer))
    if cls is None:
        raise ValueError(
            f"LoRA site {name!r} is a PEFT {type(layer).__module__}.{type(layer).__name__}; LoRA-drop covers "
            "linear layers (lora.Linear, also over Conv1D, and bitsandbytes 4/8-bit): target linear modules"
        )
    layer.__class__ = cls
    return layer
