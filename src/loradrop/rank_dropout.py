"""DropLoRA's rank mask, switched on and off for a whole PEFT model.

In training, each LoRA site multiplies its rank-r hidden ``h = A x`` by a Bernoulli(1 - p) mask; in
eval the full rank is used. The mask is the ``rank_dropout`` attribute of each site's
``layer.LoraDropLinear`` (PEFT's layer, so merging, saving and quantised bases keep working, and no
parameter is added). A shared LoRA is called once per sharing site, so every site draws its own mask.
Masks come from torch's default generator: ``torch.manual_seed`` makes them reproducible and gradient
checkpointing replays them.
"""

from __future__ import annotations

import torch.nn as nn

from .config import RankDropoutConfig
from .sites import lora_layers, set_on_sites


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
    return set_on_sites(model, rank_dropout=cfg)


def remove_rank_dropout(model: nn.Module) -> nn.Module:
    """Switches the rank mask off, leaving a plain PEFT model's behaviour. Returns the model."""
    return set_on_sites(model, rank_dropout=None)


def rank_dropout_of(model: nn.Module) -> RankDropoutConfig | None:
    """The rank mask that is on (every site has the same one, as ``add_rank_dropout`` sets it), if any."""
    configs = {layer.rank_dropout for layer in lora_layers(model).values()}
    if len(configs) > 1:
        raise ValueError(f"the sites of this model have different rank masks {configs}; set one with add_rank_dropout")
    return next(iter(configs), None)
