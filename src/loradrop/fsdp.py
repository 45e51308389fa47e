"""LoRA-drop under FSDP2 (``torch.distributed.fsdp.fully_shard``): shared LoRAs kept replicated.

A shared LoRA is one ``nn.Linear`` used by many decoder layers. FSDP2 puts each parameter in exactly
one shard group (a parameter seen by two groups is refused at the first forward), and the
all-gather of a layer's group must not depend on another layer's. So every shared LoRA stays out of
FSDP: it is passed to ``fully_shard`` as ``ignored_params`` for every layer and the root, stays a
plain, full tensor on every rank (a few r x d matrices per module type), and this module averages
its gradient over the ranks itself. Retained LoRAs are ordinary parameters of their layer and are
sharded with it.

Why a post-accumulate-grad hook (and not an optimizer pre-step hook or a Trainer callback): the
autograd engine accumulates the gradients of all sites of a shared LoRA before it runs the
parameter's ``AccumulateGrad`` once per backward, so the hook sees the complete gradient exactly
when the lowest sharing layer's backward is done. The all-reduce starts there, asynchronously, and
overlaps the backward of the layers below; a callback queued on the autograd engine waits for it
and divides by the world size when the backward ends -- the same point at which FSDP2 finishes its
own reduce-scatters -- so after ``backward()`` every gradient is final, whatever loop (Trainer,
accelerate, a hand-written one) steps the optimizer next. It follows FSDP2's own switch: while
``set_requires_gradient_sync(False)`` is in force (gradient accumulation without communication,
what accelerate's ``no_sync`` sets) it does not communicate either, and the accumulated gradient is
reduced once, at the backward that syncs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from peft import PeftModel
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .sharing import shared_groups
from .sites import lora_layers

_HOOKED = "_loradrop_grad_sync"


def replicated_modules(model: nn.Module) -> list[nn.Module]:
    """The ``lora_A`` and ``lora_B`` modules of every shared LoRA, each once: what FSDP must leave
    out (accelerate's ``FullyShardedDataParallelPlugin.ignored_modules`` takes this list)."""
    adapter = model.active_adapter if isinstance(model, PeftModel) else "default"
    layers = lora_layers(model)
    modules = []
    for sites in shared_groups(model, adapter).values():
        layer = layers[sites[0].name]
        modules += [layer.lora_A[adapter], layer.lora_B[adapter]]
    return modules


def replicated_params(model: nn.Module) -> set[nn.Parameter]:
    """The parameters of every shared LoRA: ``fully_shard``'s ``ignored_params``."""
    return {p for module in replicated_modules(model) for p in module.parameters()}


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: those whose class transformers names in the model's
    ``_no_split_modules`` (the decoder or encoder layers; accelerate's default wrap policy too)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(base).__name__} names no layer class in _no_split_modules ({sorted(names)}), so loradrop does not "
            "know which modules to shard: pass layer_classes=(YourDecoderLayer,) to shard_model"
        )
    return layers


def _gradient_sync_on(model: nn.Module) -> bool:
    """Whether FSDP2 reduces gradients in this backward: False while ``set_requires_gradient_sync(False)``
    is in force on the root. FSDP2 keeps this switch on its parameter groups and has no getter; a
    torch without it reads as True (sync every backward: more communication, the same result, since
    averaging is linear and the part averaged before is the same on every rank)."""
    if not isinstance(model, FSDPModule):
        return True
    groups = getattr(model._get_fsdp_state(), "_fsdp_param_groups", [])
    return all(getattr(g, "reduce_grads", True) for g in groups)


class _ReplicatedGradSync:
    """Averages the gradients of replicated (FSDP-ignored) parameters over the ranks of ``group``:
    an asynchronous all-reduce from each parameter's post-accumulate-grad hook, waited for (and
    divided by the world size, as FSDP2 averages its gradients) when the backward ends."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None):
        self.model, self.group = model, group
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []

    def __call__(self, param: torch.Tensor) -> None:
        if not _gradient_sync_on(self.model):
            return
        if not self.pending:
            torch.autograd.Variable._execution_engine.queue_callback(self.finish)
        self.pending.append((dist.all_reduce(param.grad, group=self.group, async_op=True), param.grad))

    def finish(self) -> None:
        world = dist.get_world_size(self.group)
        for work, grad in self.pending:
            work.wait()
            grad.div_(world)
        self.pending.clear()


def sync_replicated_grads(model: nn.Module, params: set[nn.Parameter] | None = None,
                          group: dist.ProcessGroup | None = None) -> None:
    """Makes every backward average the gradients of ``params`` (default: the shared LoRAs) over the
    ranks, as FSDP does for what it shards. Registered once per parameter; a no-op outside
    torch.distributed or on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    sync = _ReplicatedGradSync(model, group)
    for param in replicated_params(model) if params is None else params:
        if param.requires_grad and not getattr(param, _HOOKED, False):
            param.register_post_accumulate_grad_hook(sync)
            setattr(param, _HOOKED, True)


def shard_model(model: nn.Module, *, mesh: DeviceMesh | None = None, mp_policy: MixedPrecisionPolicy | None = None,
                reshard_after_forward: bool | None = None, offload_policy: OffloadPolicy | None = None,
                layer_classes: tuple[type[nn.Module], ...] | None = None) -> nn.Module:
    """Shards a (planned) PEFT LoRA model with FSDP2 for a training loop of your own.

    Each layer (``layer_classes``, default the model's ``_no_split_modules``) becomes one FSDP unit
    with its base weights and retained LoRAs, the root holds the rest; every shared LoRA is left out
    of all of them, moved to the ranks' device, broadcast from rank 0 and its gradient averaged over
    the ranks after each backward (``sync_replicated_grads``). ``mesh`` (1-D: the ranks that shard and
    average; default all), ``mp_policy`` (e.g. ``MixedPrecisionPolicy(param_dtype=torch.bfloat16,
    reduce_dtype=torch.float32)``), ``reshard_after_forward`` and ``offload_policy`` go to
    ``fully_shard`` as they are. Call it after ``apply_plan`` (or ``load_adapter``) and before creating
    the optimizer; save with ``gathered_lora``. Needs an initialised process group.

    Gradients are then a mix of DTensors (sharded) and plain tensors (shared LoRAs): clip them with
    ``accelerate.Accelerator.clip_grad_norm_``, which combines the two, not ``torch.nn.utils.clip_grad_norm_``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("shard_model needs torch.distributed: launch with torchrun and call "
                         "torch.distributed.init_process_group first")
    if isinstance(model, FSDPModule):
        raise ValueError(f"{type(model).__name__} is already sharded by FSDP; shard_model takes the unsharded model")
    if mesh is not None and mesh.ndim != 1:
        raise ValueError(f"mesh has {mesh.ndim} dimensions; shard_model takes a 1-D mesh (FSDP). HSDP and meshes "
                         "combined with other parallelism are not supported: shard with a 1-D data-parallel mesh")
    group = mesh.get_group() if mesh is not None else None
    ignored = replicated_params(model)
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, "ignored_params": ignored,
              "mp_policy": mp_policy or MixedPrecisionPolicy(), "offload_policy": offload_policy or OffloadPolicy()}
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    layers = [m for m in base.modules() if isinstance(m, layer_classes)] if layer_classes else _decoder_layers(model)
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **{**kwargs, "reshard_after_forward": None})  # the root keeps its params for backward
    device = next(p for p in model.parameters() if isinstance(p, DTensor)).device
    with torch.no_grad():
        for module in replicated_modules(model):
            module.to(device)  # fully_shard does not move what it ignores
            for param in module.parameters():
                dist.broadcast(param, group=group, group_src=0)
    sync_replicated_grads(model, ignored, group)
    return model


@contextmanager
def gathered_lora(model: nn.Module) -> Iterator[nn.Module]:
    """While open, every trainable parameter FSDP sharded (retained LoRAs, trained heads) is a full
    tensor on its module, so ``save_adapter`` and ``export_peft`` see an ordinary PEFT model; the
    shared LoRAs are already full. Collective: enter it on every rank (each gathers the LoRA only,
    never the base weights), write on rank 0::

        with loradrop.gathered_lora(model):
            if dist.get_rank() == 0:
                loradrop.save_adapter(model, "out/adapter")

    On a model without sharded parameters it changes nothing. The sharded parameters are put back
    when it closes; do not run the model inside it.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if param.requires_grad and isinstance(param, DTensor):
                    swapped.append((module, name, param))
                    full = param.detach().full_tensor()
                    module._parameters[name] = nn.Parameter(full, requires_grad=True)
        yield model
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
