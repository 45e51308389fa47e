"""LoRA-drop's first stage: how much each site's LoRA changes its layer's output.

Per site, g = sum over probe tokens of ||Delta W x||^2, with Delta W x = scaling * B A x the LoRA
branch output (PEFT's scaling included), padding excluded: the forward's ``attention_mask`` (by
keyword or position) masks the input tokens; at decoder sites of an encoder-decoder model the
``decoder_attention_mask`` (else ``labels != -100``) does, and cross-attention keys and values use the
encoder's mask. A forward without a mask counts every token; a mask whose shape does not fit a site's
tokens is an error. ``tokens="response"`` counts a causal LM's response tokens only (``labels != -100``:
the tokens its loss is on) instead of every non-padding token. Each site's ``observer`` slot
(``layer.LoraDropLinear``) is given the hidden h = A x (r values per token) on either forward path,
and the probe computes
||s B h||^2 = s^2 h^T (B^T B) h: r-wide work per token, never a copy of the d_out-wide output. The sums
stay on the device in float64 until ``scores()``, so the probe never syncs with the host. The observer
belongs to the site, so a shared LoRA is booked per site.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper
from torch.distributed.fsdp import FSDPModule
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from .config import PROBE_TOKENS, LoraDropConfig
from .selection import Importance, Plan, select
from .sites import Site, add_lora, find_sites, lora_layers, sites_by_type
from .tasks.sampling import stratified_sample


_CROSS_ATTENTION = ("EncDecAttention", "encoder_attn", "crossattention", "cross_attn")
_KEYS_VALUES = ("k", "v", "k_proj", "v_proj", "key", "value")


def _reads_decoder_tokens(site_name: str) -> bool:
    """For an encoder-decoder model: whether a site's input is the decoder's tokens (decoder layers,
    except the keys and values of cross-attention, which project the encoder's output)."""
    parts = site_name.split(".")
    if "decoder" not in parts:
        return False
    return not (any(p in _CROSS_ATTENTION for p in parts) and parts[-1] in _KEYS_VALUES)


def _named_inputs(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A forward's arguments by name, positional ones bound to the model's signature (a PEFT wrapper
    taking ``*args`` is bound to its base model's)."""
    if not args:
        return kwargs
    forward = module.forward
    params = inspect.signature(forward).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params) and hasattr(module, "get_base_model"):
        forward = module.get_base_model().forward
    try:
        bound = inspect.signature(forward).bind_partial(*args, **kwargs)
    except TypeError:
        return kwargs
    named = dict(bound.arguments)
    for name, param in inspect.signature(forward).parameters.items():
        if param.kind is param.VAR_KEYWORD:
            named.update(named.pop(name, {}))
    return named


class ImportanceProbe:
    """Context manager: while active, accumulates g = sum ||Delta W x||^2 per site.

    ``record_examples=True`` also keeps each example's sum (for the output-norm histograms of the
    paper's Figure 2).
    """

    def __init__(self, model: nn.Module, adapter_name: str = "default", record_examples: bool = False,
                 tokens: str = "input"):
        if tokens not in PROBE_TOKENS:
            raise ValueError(f"tokens={tokens!r} is invalid: must be one of {', '.join(PROBE_TOKENS)}")
        self.model = model
        self.adapter_name = adapter_name
        self.record_examples = record_examples
        self.tokens = tokens
        self.sites = find_sites(model)
        self._layers = lora_layers(model)
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._mask: torch.Tensor | None = None
        self._decoder_mask: torch.Tensor | None = None
        encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self._site_reads_decoder = {s: encoder_decoder and _reads_decoder_tokens(s.name) for s in self.sites}
        self.reset()

    def reset(self) -> None:
        self._sums: dict[Site, torch.Tensor] = {}
        self._examples: dict[Site, list[torch.Tensor]] = {s: [] for s in self.sites}

    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The padding masks of this forward, whether passed by keyword or position: ``attention_mask``
        for the (encoder's) input tokens and, for an encoder-decoder model, ``decoder_attention_mask``
        -- or, without it, the positions whose ``labels`` are not -100, which is what the decoder's
        input is shifted from when ``decoder_input_ids`` are not given."""
        inputs = _named_inputs(module, args, kwargs)
        mask, labels = inputs.get("attention_mask"), inputs.get("labels")
        if self.tokens == "response":
            if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
                raise ValueError("probe_tokens='response' counts the tokens whose labels are not -100, but this batch "
                                 "has no token labels: give the probe a causal LM's tokenized data, or use 'input'")
            mask = labels != -100
        self._mask = mask.float() if isinstance(mask, torch.Tensor) else None
        decoder = inputs.get("decoder_attention_mask")
        if (decoder is None and inputs.get("decoder_input_ids") is None and isinstance(labels, torch.Tensor)
                and labels.dim() == 2):
            decoder = labels != -100
        self._decoder_mask = decoder.float() if isinstance(decoder, torch.Tensor) else None

    def _mask_of(self, site: Site, per_token: torch.Tensor) -> torch.Tensor | None:
        """The mask of the tokens ``site`` saw: the decoder's for decoder sites of an encoder-decoder
        model, except cross-attention keys and values, which read the encoder's tokens. None (every
        token counts) when the forward got no mask. A mask that does not fit the site's tokens is an
        error rather than padding silently counted."""
        mask = self._decoder_mask if self._site_reads_decoder[site] else self._mask
        if mask is None:
            return None
        if mask.shape != per_token.shape:
            if mask.numel() != per_token.numel():
                which = "decoder_attention_mask" if self._site_reads_decoder[site] else "attention_mask"
                raise ValueError(
                    f"the {which} of this batch has shape {tuple(mask.shape)} but site {site.name!r} saw tokens of "
                    f"shape {tuple(per_token.shape)}: the probe cannot tell its padding apart; pass the mask of "
                    "the tokens this site reads"
                )
            mask = mask.reshape(per_token.shape)
        return mask

    def _observer(self, site: Site) -> Callable[[torch.Tensor], None]:
        lora_b = self._layers[site.name].lora_B[self.adapter_name]

        def observe(hidden: torch.Tensor) -> None:
            h, weight = hidden.detach().float(), lora_b.weight.detach().float()
            if lora_b.bias is None:
                # ||B h||^2 = h^T (B^T B) h: r-wide work per token instead of d_out-wide; the scaling^2
                # factor is applied once, when the sums are read
                per_token = torch.linalg.vecdot(h @ (weight.T @ weight), h)
            else:
                per_token = F.linear(h, weight, lora_b.bias.detach().float()).square().sum(-1)
            self._book(site, per_token)

        return observe

    def _book(self, site: Site, per_token: torch.Tensor) -> None:
        mask = self._mask_of(site, per_token)
        if mask is not None:
            per_token = per_token * mask
        total = per_token.sum(dtype=torch.float64)
        self._sums[site] = self._sums[site] + total if site in self._sums else total
        if self.record_examples:
            per_example = per_token.reshape(per_token.shape[0], -1).sum(-1) if per_token.dim() > 1 else per_token
            self._examples[site].append(per_example.double())

    def __enter__(self) -> ImportanceProbe:
        for site in self.sites:  # check everything before changing anything
            layer = self._layers[site.name]
            if self.adapter_name not in layer.lora_B:
                raise ValueError(f"site {site.name!r} has no LoRA adapter named {self.adapter_name!r}")
            if layer.observer is not None:
                raise ValueError(f"site {site.name!r} is already observed: one ImportanceProbe at a time")
        self._handle = self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)
        for site in self.sites:
            self._layers[site.name].observer = self._observer(site)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for layer in self._layers.values():
            layer.observer = None
        self._mask = self._decoder_mask = None

    # -- results -----------------------------------------------------------------------------
    def raw_scores(self) -> dict[Site, float]:
        """g per site, summed over all processes when torch.distributed is initialised."""
        device = _device_of(self.model)  # also where a rank that saw no example sums
        zero = torch.zeros((), dtype=torch.float64, device=device)
        stacked = torch.stack([self._sums.get(s, zero).to(device) for s in self.sites])
        if _distributed():
            dist.all_reduce(stacked)
        sums = stacked.tolist()  # the one host sync of the probe
        return {s: v * self._scale(s) for s, v in zip(self.sites, sums)}

    def _scale(self, site: Site) -> float:
        """scaling^2 of the site: ||Delta W x||^2 = scaling^2 ||B A x||^2."""
        return float(self._layers[site.name].scaling[self.adapter_name]) ** 2

    def scores(self) -> tuple[Importance, Importance]:
        """(g, I): g per module type and layer, and I = g normalised within each module type."""
        raw = self.raw_scores()
        g: Importance = {}
        for module_type, sites in sites_by_type(self.sites).items():
            g[module_type] = {s.layer: raw[s] for s in sites}
        return g, normalise(g)

    def example_norms(self) -> dict[Site, torch.Tensor]:
        """Per site, the squared LoRA output norm of every probed example (CPU, float64)."""
        if not self.record_examples:
            raise ValueError("example norms were not recorded: create the probe with record_examples=True")
        local = {s: (torch.cat(v).cpu() if v else torch.zeros(0, dtype=torch.float64)) * self._scale(s)
                 for s, v in self._examples.items()}
        if not _distributed():
            return local
        gathered: list[dict[Site, torch.Tensor]] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, local)
        return {s: torch.cat([part[s] for part in gathered]) for s in self.sites}


def normalise(g: Importance) -> Importance:
    """I_i = g_i / sum g within each module type; an error when a type's LoRA produced no output."""
    importance: Importance = {}
    for module_type, scores in g.items():
        total = sum(scores.values())
        if not math.isfinite(total):
            raise ValueError(
                f"the LoRA output norms of {module_type!r} are not finite ({total}): the probe training "
                "diverged; lower probe_lr"
            )
        if total <= 0.0:
            raise ValueError(
                f"every LoRA output of {module_type!r} is zero, so importance is undefined: no update "
                "reached lora_B. Train the probe longer (probe_epochs, probe_max_steps) or with a larger "
                "probe_lr, and check that the loss depends on these layers"
            )
        importance[module_type] = {layer: v / total for layer, v in scores.items()}
    return importance


@dataclass
class ImportanceResult:
    """What the probe found: g and I per module type and layer, and the plan they choose."""

    g: Importance
    importance: Importance
    plan: Plan
    sample_size: int
    probe_steps: int
    lora_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    example_norms: dict[Site, torch.Tensor] | None = field(default=None, repr=False)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to_device(batch: Any, device: torch.device) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"a probe batch must be a dict of tensors (input_ids, attention_mask, labels), got {type(batch).__name__}; "
            "pass a collate_fn or a tokenizer so loradrop can pad the examples"
        )
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world() -> tuple[int, int]:
    """(processes, this rank): (1, 0) outside torch.distributed."""
    return (dist.get_world_size(), dist.get_rank()) if _distributed() else (1, 0)


def _train_loader(sample: Any, cfg: LoraDropConfig, collate_fn: Callable | None) -> tuple[DataLoader, DistributedSampler]:
    """Shuffled batches of this rank's share. One sampler in every case, so a run on N processes
    with batch b sees, step by step, the same examples as one process with batch N * b."""
    processes, rank = _world()
    sampler = DistributedSampler(sample, num_replicas=processes, rank=rank, shuffle=True, seed=cfg.seed)
    return DataLoader(sample, batch_size=cfg.probe_batch_size, sampler=sampler, collate_fn=collate_fn), sampler


def _measure_loader(sample: Any, cfg: LoraDropConfig, collate_fn: Callable | None) -> DataLoader:
    """This rank's examples for the measuring pass: every example on exactly one rank, none twice."""
    processes, rank = _world()
    return DataLoader(Subset(sample, range(rank, len(sample), processes)), batch_size=cfg.probe_batch_size,
                      collate_fn=collate_fn)


def _default_collate(tokenizer: Any | None) -> Callable:
    if tokenizer is not None:
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)
    from transformers import default_data_collator

    return default_data_collator


def _probe_train(model: nn.Module, sample: Any, collate_fn: Callable | None, cfg: LoraDropConfig,
                 show_progress: bool) -> int:
    """Trains the probe's LoRA; data-parallel when torch.distributed is initialised: torch DDP, or
    FSDP2 itself when the model is already sharded with ``fully_shard`` (it averages the gradients)."""
    loader, sampler = _train_loader(sample, cfg, collate_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.probe_lr)
    steps = max(1, math.ceil(cfg.probe_epochs * len(loader)))
    if cfg.probe_max_steps is not None:
        steps = min(steps, cfg.probe_max_steps)
    device = _device_of(model)
    trained = model
    if _distributed() and not isinstance(model, FSDPModule):
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    model.train()

    def batches() -> Iterator[Any]:
        for epoch in itertools.count():
            sampler.set_epoch(epoch)
            yield from loader

    with tqdm(total=steps, desc="probe: training LoRA", disable=not show_progress) as bar:
        for _, batch in zip(range(steps), batches()):
            loss = trained(**_to_device(batch, device)).loss
            if loss is None:
                raise ValueError("the model returned no loss on a probe batch: the data set needs a labels column")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update()
    return steps


@torch.no_grad()
def _probe_measure(model: nn.Module, sample: Any, collate_fn: Callable | None, cfg: LoraDropConfig,
                   show_progress: bool, record_examples: bool) -> ImportanceProbe:
    device = _device_of(model)
    model.eval()
    with ImportanceProbe(model, cfg.adapter_name, record_examples, cfg.probe_tokens) as probe:
        loader = _measure_loader(sample, cfg, collate_fn)
        for batch in tqdm(loader, desc="probe: measuring ||dW x||^2", disable=not show_progress):
            model(**_to_device(batch, device))
    return probe


def _check_same_on_every_rank(text: str, device: torch.device) -> None:
    """Fails loudly unless every rank holds the same ``text`` (the plan): compares SHA-256 digests."""
    digest = torch.tensor(list(hashlib.sha256(text.encode()).digest()), dtype=torch.int64, device=device)
    lowest, highest = digest.clone(), digest.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    if not torch.equal(lowest, highest):
        raise RuntimeError(
            f"rank {dist.get_rank()}: the LoRA-drop plan differs across ranks; every rank must probe the same "
            "model on the same data with the same config and seed"
        )


def _unwrap(model: PeftModel, requires_grad: dict[str, bool]) -> None:
    """Gives back the plain model that ``add_lora`` wrapped in place, exactly as it was: PEFT's
    unload, with the original (untrained) modules_to_save heads put back and requires_grad restored."""
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            module.set_adapter([])  # unload then returns the original module, not the probe-trained copy
    base = model.unload()
    for name, param in base.named_parameters():
        param.requires_grad_(requires_grad[name])


def evaluate_importance(
    model: nn.Module,
    train_dataset: Any,
    cfg: LoraDropConfig,
    *,
    collate_fn: Callable | None = None,
    tokenizer: Any | None = None,
    show_progress: bool = False,
    record_examples: bool = False,
) -> ImportanceResult:
    """Stage 1 of LoRA-drop: train LoRA briefly on a stratified ``cfg.sample_ratio`` sample, then
    measure each site's LoRA output over that sample in one no-grad eval pass.

    ``model`` is a PEFT LoRA model (trained in place; ``apply_plan`` re-initialises it when
    ``cfg.reinit``) or a plain transformers model, which gets LoRA as ``cfg`` says for the probe and
    comes back unchanged (the probe's LoRA weights are kept in the result for ``reinit=False``).
    Base weights are never updated. A plain model's probe LoRA takes ``cfg.fast_path``; a PEFT
    model's sites keep their own setting. Batches come from ``collate_fn``, else
    from a padding collator built on ``tokenizer``, else from transformers' default collator
    (examples of equal length).

    Under torch.distributed (torchrun, accelerate launch) every rank draws the same sample, the probe
    trains data-parallel with torch DDP (``probe_batch_size`` per process), each rank measures its
    share of the sample, g is summed over ranks, and the plan is checked to be identical everywhere.
    A PEFT model sharded with FSDP2 (``loradrop.shard_model``) is probed the same way, FSDP2 taking
    DDP's place; a plain model must not be sharded yet (its probe LoRA would be added to shards).
    """
    if isinstance(model, FSDPModule) and not isinstance(model, PeftModel):
        raise ValueError(
            f"{type(model).__name__} is sharded by FSDP but has no LoRA: add LoRA first (peft.get_peft_model), "
            "then shard it (loradrop.shard_model) and probe the PEFT model"
        )
    sample = stratified_sample(train_dataset, cfg.sample_ratio, cfg.label_column, cfg.seed)
    wrapped = not isinstance(model, PeftModel)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    peft_model = add_lora(model, cfg) if wrapped else model
    collate = collate_fn or _default_collate(tokenizer)
    try:
        show_progress = show_progress and _world()[1] == 0
        steps = _probe_train(peft_model, sample, collate, cfg, show_progress)
        probe = _probe_measure(peft_model, sample, collate, cfg, show_progress, record_examples)
        g, importance = probe.scores()
        lora_state = None
        if wrapped:
            lora_state = {n: p.detach().cpu().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    finally:
        if wrapped:
            _unwrap(peft_model, requires_grad)
    plan = select(importance, cfg)
    if _distributed():
        _check_same_on_every_rank(plan.to_json(), _device_of(peft_model))
    return ImportanceResult(
        g=g,
        importance=importance,
        plan=plan,
        sample_size=len(sample),
        probe_steps=steps,
        lora_state=lora_state,
        example_norms=probe.example_norms() if record_examples else None,
    )
