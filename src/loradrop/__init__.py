"""loradrop: LoRA-drop (output-based LoRA pruning with a shared LoRA) and DropLoRA on PEFT."""

from .adapter_io import describe_adapter, export_peft, load_adapter, save_adapter
from .fsdp import gathered_lora, shard_model
from .config import LoraDropConfig, RankDropoutConfig, RunConfig
from .probe import ImportanceProbe, ImportanceResult, evaluate_importance
from .layer import LoraDropLinear
from .liger import apply_liger
from .rank_dropout import add_rank_dropout, remove_rank_dropout
from .selection import Plan, select
from .sharing import apply_plan, lora_parameter_count, summary
from .sites import Site, disable_fast_path, enable_fast_path, fast_path_enabled, find_sites
from .tasks import stratified_sample

__version__ = "0.1.0"

__all__ = [
    "ImportanceProbe",
    "ImportanceResult",
    "LoraDropConfig",
    "LoraDropLinear",
    "Plan",
    "RankDropoutConfig",
    "RunConfig",
    "Site",
    "add_rank_dropout",
    "apply_liger",
    "apply_plan",
    "describe_adapter",
    "disable_fast_path",
    "enable_fast_path",
    "evaluate_importance",
    "export_peft",
    "fast_path_enabled",
    "find_sites",
    "gathered_lora",
    "load_adapter",
    "lora_parameter_count",
    "remove_rank_dropout",
    "save_adapter",
    "select",
    "shard_model",
    "stratified_sample",
    "summary",
]
