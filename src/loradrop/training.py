"""One fine-tuning run: model + task + method + seed, on transformers' Trainer.

A run directory holds everything a run produced and everything it needs to resume after a kill:
``importance.json`` (the probe's result, so a resumed run does not probe again), Trainer checkpoints,
the best compact adapter (``adapter/``, rewritten atomically whenever the validation metric
improves), ``best.json``, the report figures and finally ``results.json``. A run whose
``results.json`` exists is finished and is not run again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from accelerate import PartialState
from accelerate.utils import set_seed as seed_per_rank
from datasets import DatasetDict
from peft import PeftModel
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, set_seed

from . import __version__, run_dir
from .adapter_io import atomic_write_bytes, describe_adapter, save_adapter, write_json
from .config import METHODS, LoraDropConfig, RunConfig, run_lora_defaults
from .probe import ImportanceResult, evaluate_importance
from .fsdp import gathered_lora, replicated_modules, sync_replicated_grads
from .generate_eval import evaluate_generation
from .liger import apply_liger, liger_report
from .models import load_causal_lm, load_classifier, tokenize_task
from .report import importance_heatmap, output_norm_histograms, results_table
from .selection import Plan, select
from .sharing import apply_plan, lora_parameter_count
from .sites import add_lora, find_sites, site_layers
from .tasks.generation import generation_collator, tokenize_generation
from .tasks.metrics import compute_metrics, majority_baseline
from .tasks.registry import Task, get_task, load_task
from .tasks.user_data import load_user_task
from .tasks.user_generation import load_user_generation_task

def _state() -> PartialState:
    """accelerate's view of the launch. Without CUDA, torchrun's processes are CPU ranks (gloo),
    which accelerate and the Trainer only treat as distributed when told to use the CPU."""
    return PartialState(cpu=not torch.cuda.is_available())


def _is_main() -> bool:
    """Only the main process writes files (under torchrun / accelerate launch every rank runs this)."""
    return _state().is_main_process


# -- data and model ------------------------------------------------------------------------------
def _load_data(cfg: RunConfig) -> tuple[Task, Any]:
    if cfg.data is not None and (cfg.prompt_column or cfg.messages_column):
        return load_user_generation_task(cfg.data, cfg.prompt_column or "prompt", cfg.response_column,
                                         cfg.messages_column, seed=cfg.seed, metric=cfg.generation_metric)
    if cfg.data is not None:
        return load_user_task(cfg.data, cfg.text_column, cfg.label_column, cfg.text_pair_column, seed=cfg.seed)
    return get_task(cfg.task), load_task(cfg.task, seed=cfg.seed)


def _limit(dataset: Any, n: int | None, seed: int) -> Any:
    if n is None or n >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(n))


def _prepare(cfg: RunConfig) -> tuple[Task, Any, Any, Any, Any, LoraDropConfig]:
    """Task, raw and tokenized data, model, tokenizer and LoRA-drop config of a run."""
    task, data = _load_data(cfg)
    data["train"] = _limit(data["train"], cfg.max_train_examples, cfg.seed)
    if task.label_kind == "generation":
        return _prepare_generation(cfg, task, data)
    model, tokenizer = load_classifier(cfg.model, task.num_labels, task.label_names, cfg.dtype)
    model.to(_state().device)  # the probe runs before the Trainer would move the model
    tokenized = tokenize_task(data, tokenizer, task, cfg.max_length)
    return task, data, model, tokenizer, tokenized, cfg.loradrop_config()


def _prepare_generation(cfg: RunConfig, task: Task, data: Any) -> tuple[Task, Any, Any, Any, Any, LoraDropConfig]:
    """A causal LM and its tokenizer; prompt + response tokenized with the prompt masked, and what the
    length policy left out kept for results.json (``length_report``)."""
    model, tokenizer = load_causal_lm(cfg.model, cfg.dtype)
    model.to(_state().device)
    tokenized, reports = tokenize_generation(data, tokenizer, cfg.max_length, cfg.truncation)
    tokenized = _GenerationData(tokenized)
    tokenized.length_report = {split: asdict(r) for split, r in reports.items()}
    return task, data, model, tokenizer, tokenized, cfg.loradrop_config()


class _GenerationData(DatasetDict):
    """Tokenized generation data, and what the length policy did to each split (for results.json)."""

    length_report: dict[str, dict[str, int]]


def _collator(tokenizer: Any, tokenized: Any) -> Any:
    """Pads token labels with -100 for a causal LM (labels are lists), else the classifier's padding."""
    first = tokenized[0]["labels"] if len(tokenized) else None
    return generation_collator(tokenizer) if isinstance(first, list) else DataCollatorWithPadding(tokenizer)


class _GenerationMetric(TrainerCallback):
    """At each evaluation, answers the first ``examples`` validation prompts greedily and puts the
    task's metric into the evaluation's metrics as ``eval_metric`` (and the perplexity of the
    validation loss), before ``_KeepBest`` reads them: callbacks see the same dict in order."""

    def __init__(self, task: Task, tokenizer: Any, validation: Any, cfg: RunConfig):
        self.task, self.tokenizer, self.validation, self.cfg = task, tokenizer, validation, cfg

    def score(self, model: Any) -> dict[str, float]:
        result = evaluate_generation(model, self.tokenizer, self.validation, self.task.metric, self.cfg.max_new_tokens,
                                     batch_size=self.cfg.batch_size, max_examples=self.cfg.generation_eval_examples)
        return result.scores

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    model: Any = None, **kwargs: Any) -> None:
        if metrics is None:
            return
        scores = {f"eval_{k}": v for k, v in self.score(model).items()}
        if "eval_loss" in metrics:
            scores["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 700.0))
        metrics.update(scores)
        # the Trainer logged a copy of the metrics just before: its history (the learning curve) gets them too
        last = state.log_history[-1] if state.log_history else {}
        if last.get("step") == state.global_step and "eval_loss" in last:
            last.update(scores)


# -- stage 1 -------------------------------------------------------------------------------------
def _importance_record(result: ImportanceResult, seconds: float) -> dict[str, Any]:
    return {"g": result.g, "importance": result.importance, "plan": asdict(result.plan),
            "sample_size": result.sample_size, "probe_steps": result.probe_steps, "seconds": seconds}


def _importance_from(record_file: Path) -> dict[str, dict[int, float]]:
    importance = json.loads(record_file.read_text())["importance"]
    return {t: {int(layer): v for layer, v in scores.items()} for t, scores in importance.items()}


def _write_probe_report(out: Path, result: ImportanceResult) -> None:
    importance_heatmap(result.importance, out / "importance_heatmap.png", plan=result.plan,
                       title="LoRA importance I / max I (boxes: retained)")
    if result.example_norms:
        output_norm_histograms(result.example_norms, out / "output_norms.png")


def _plan(model: PeftModel, train: Any, tokenizer: Any, cfg: RunConfig, ld_cfg: LoraDropConfig, out: Path,
          importance_from: Path | None) -> tuple[Plan, float]:
    """The run's plan: every site for plain LoRA; else from this run's earlier probe (resume), from
    another run's probe (the same importance serves every strategy), or from a new probe."""
    if METHODS[cfg.method][0] is None:
        layers = site_layers(find_sites(model))
        return Plan(layers=layers, retained=layers, threshold=1.0), 0.0
    record = out / "importance.json"
    source = record if record.exists() else importance_from / "importance.json" if importance_from else None
    if source is not None:
        if source != record and _is_main():
            write_json(json.loads(source.read_text()), record)
        return select(_importance_from(source), ld_cfg), 0.0
    probed = _probe_and_record(model, train, tokenizer, cfg, ld_cfg, out)
    return Plan(**probed["plan"]), probed["seconds"]


def _probe_and_record(model: Any, train: Any, tokenizer: Any, cfg: RunConfig, ld_cfg: LoraDropConfig,
                      out: Path) -> dict[str, Any]:
    """Runs the probe; the main process writes importance.json and the probe's figures."""
    start = time.perf_counter()
    result = evaluate_importance(model, train, ld_cfg, tokenizer=tokenizer, show_progress=cfg.show_progress,
                                 record_examples=True, collate_fn=_collator(tokenizer, train))
    record = _importance_record(result, time.perf_counter() - start)
    if _is_main():
        write_json(record, out / "importance.json")
        _write_probe_report(out, result)
    return record


def _fsdp_version(cfg: RunConfig) -> int | None:
    """The FSDP version the run trains under, None without FSDP: TrainingArguments' ``fsdp`` (through
    ``extra``; transformers' default version is 2) or an ``accelerate launch`` FSDP config
    (``fsdp_version``; accelerate's default is 1)."""
    if cfg.extra.get("fsdp"):
        fsdp_config = cfg.extra.get("fsdp_config")
        return int(fsdp_config.get("version", 2)) if isinstance(fsdp_config, dict) else 2
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return int(os.environ.get("FSDP_VERSION", "1"))
    return None


def _check_fsdp(plan: Plan, cfg: RunConfig) -> None:
    """Before training: a shared LoRA trains under FSDP2 only (replicated beside the shards, see
    ``loradrop.fsdp``); FSDP1 flattens each unit's parameters into one shard group and has no such way."""
    version = _fsdp_version(cfg)
    if version not in (None, 2) and plan.others == "shared" and any(plan.others_of(t) for t in plan.layers):
        raise ValueError(
            f"FSDP version {version} cannot train a LoRA that several layers share; use FSDP2 (fsdp_version: 2 in the "
            "accelerate config, or fsdp_config={'version': 2}), data parallelism (torchrun / accelerate launch without "
            "an FSDP config), or method lora or no-share under FSDP1"
        )


def _replicate_shared_loras(trainer: Trainer, model: PeftModel) -> None:
    """Under FSDP2, hands accelerate the shared LoRAs as ``ignored_modules`` (fully_shard's
    ``ignored_params``: replicated, in no layer's unit) and has ``loradrop.fsdp`` average their
    gradients; bf16 runs reduce gradients in float32. Called after the Trainer made its accelerator
    and before ``train`` shards the model."""
    if not trainer.is_fsdp_enabled:
        return
    plugin = trainer.accelerator.state.fsdp_plugin
    if plugin.activation_checkpointing:
        raise ValueError("fsdp_activation_checkpointing=true wraps each layer in torch's checkpoint wrapper, under which "
                         "PEFT finds no adapter weights to save; set fsdp_activation_checkpointing: false in the FSDP "
                         "config and pass --gradient-checkpointing instead")
    if plugin.fsdp_version == 2 and plugin.mixed_precision_policy is not None:
        plugin.mixed_precision_policy = replace(plugin.mixed_precision_policy, reduce_dtype=torch.float32)
    shared = replicated_modules(model)
    if not shared:
        return
    if plugin.ignored_modules is not None:
        raise ValueError(f"fsdp_ignored_modules={plugin.ignored_modules!r}: loradrop sets FSDP's ignored modules to "
                         "the shared LoRAs itself; remove fsdp_ignored_modules from the FSDP config")
    if plugin.cpu_ram_efficient_loading:
        raise ValueError("fsdp_cpu_ram_efficient_loading=true would move the replicated shared LoRAs to the meta "
                         "device; set fsdp_cpu_ram_efficient_loading: false in the FSDP config")
    plugin.ignored_modules = shared
    sync_replicated_grads(model)


# -- stage 2 -------------------------------------------------------------------------------------
class _KeepBest(TrainerCallback):
    """After each evaluation, writes the compact adapter when the validation metric improved."""

    def __init__(self, out: Path):
        self.out = out
        self.best_file = out / "best.json"
        self.best = json.loads(self.best_file.read_text()) if self.best_file.exists() else None

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    model: Any = None, **kwargs: Any) -> None:
        score = (metrics or {}).get("eval_metric")
        if score is None or math.isnan(score) or (self.best is not None and score <= self.best["metric"]):
            return
        self.best = {"metric": score, "step": state.global_step,
                     "scores": {k.removeprefix("eval_"): v for k, v in metrics.items()}}
        with gathered_lora(model):  # every rank: under FSDP2 this gathers the sharded LoRAs
            if _is_main():  # every rank tracks the best (metrics are gathered), one writes
                save_adapter(model, self.out / "adapter")
                write_json(self.best, self.best_file)


def _checkpointing_args(enabled: bool) -> dict[str, Any]:
    """Non-reentrant recomputation (reentrant replays would split a shared LoRA's gradient), under the
    name this transformers takes: 5.x renamed ``gradient_checkpointing`` to ``activation_checkpointing``
    (5.17 knows only the old name, 5.24 both, the old one deprecated)."""
    prefix = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    return {f"{prefix}_checkpointing": enabled, f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def _training_args(cfg: RunConfig, out: Path, steps_per_epoch: int, generation: bool = False) -> TrainingArguments:
    eval_steps = cfg.eval_steps or steps_per_epoch
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    defaults: dict[str, Any] = dict(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size * 2,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        warmup_steps=0,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=1,
        logging_steps=max(1, min(50, eval_steps)),
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,  # the same shuffle on every rank, whatever the per-rank seeds of the masks
        use_cpu=not torch.cuda.is_available(),  # see _state
        bf16=bf16,
        disable_tqdm=not cfg.show_progress,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA site is used in every forward
        **_checkpointing_args(cfg.gradient_checkpointing),
        # A classifier's loss is a mean over the batch, but a PEFT model's forward takes **kwargs, so the
        # Trainer would treat it as a token-sum loss and multiply it by the number of processes.
        average_tokens_across_devices=False,
    )
    if generation:  # batches of similar lengths pad little; the loss is a mean over response tokens
        defaults.update(train_sampling_strategy="group_by_length")
    return TrainingArguments(**{**defaults, **cfg.extra})  # cfg.extra overrides any of the above


def _versions() -> dict[str, str]:
    return {"loradrop": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def run(cfg: RunConfig, importance_from: Path | None = None, base_scores_from: Path | None = None) -> dict[str, Any]:
    """Runs (or resumes, or returns the finished) run in ``cfg.output_dir``; returns results.json's
    content. ``importance_from`` reuses another run's probe (same data, model and seed);
    ``base_scores_from`` another generation run's score of the base model (same model, validation
    data and generation settings), which saves generating with the un-tuned model again."""
    out = Path(cfg.output_dir)
    had_config = run_dir.check_run_dir(out, asdict(cfg))  # a rerun resumes only the same run
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    locked = False
    try:
        with run_dir.exclusive_lock(out / run_dir.LOCK_FILE, out) if _is_main() else contextlib.nullcontext():
            locked = True
            had_config = run_dir.check_run_dir(out, asdict(cfg))  # again, now that this process holds it
            return _run_locked(cfg, out, importance_from, base_scores_from, had_config or not _is_main())
    except Exception:
        if locked and _is_main():  # after the lock is released: its file is gone
            run_dir.remove_if_unused(out, created, not had_config)
        raise


def _run_locked(cfg: RunConfig, out: Path, importance_from: Path | None, base_scores_from: Path | None,
                had_config: bool) -> dict[str, Any]:
    results_file = out / "results.json"
    if results_file.exists():
        return json.loads(results_file.read_text())
    set_seed(cfg.seed)
    task, data, model, tokenizer, tokenized, ld_cfg = _prepare(cfg)
    if not had_config:  # written once the data and the model loaded: a run that cannot start leaves none
        write_json(asdict(cfg), out / run_dir.RUN_CONFIG)
    generation = task.label_kind == "generation"
    liger = (apply_liger(model, cfg.liger) if generation
             else liger_report(reason="a classifier: Liger is applied to causal LMs"))
    gen_metric = _GenerationMetric(task, tokenizer, data["validation"], cfg) if generation else None
    base_scores = _base_scores(gen_metric, model, out, base_scores_from) if gen_metric else None

    start = time.perf_counter()
    peft_model = add_lora(model, ld_cfg)  # the probe trains this LoRA; apply_plan re-initialises it
    plan, probe_seconds = _plan(peft_model, tokenized["train"], tokenizer, cfg, ld_cfg, out, importance_from)
    _check_fsdp(plan, cfg)
    peft_model = apply_plan(peft_model, plan, ld_cfg)

    steps_per_epoch = -(-len(tokenized["train"]) // (cfg.batch_size * _state().num_processes))
    trainer = Trainer(
        model=peft_model,
        args=_training_args(cfg, out, steps_per_epoch, generation),
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        data_collator=_collator(tokenizer, tokenized["train"]),
        compute_metrics=None if generation else lambda p: compute_metrics(task, p.predictions, p.label_ids),
        callbacks=([gen_metric] if gen_metric else []) + [keep_best := _KeepBest(out)],
    )
    _replicate_shared_loras(trainer, peft_model)
    seed_per_rank(cfg.seed, device_specific=True)  # rank-dropout masks differ by rank, reproducibly
    checkpoint = run_dir.newest_complete_checkpoint(out / "checkpoints", set_aside=_is_main())
    train_start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.state.global_step % trainer.args.eval_steps:  # the last steps were not evaluated yet
        trainer.evaluate()
    train_seconds = time.perf_counter() - train_start
    _state().wait_for_everyone()  # the main process has written the best adapter
    if keep_best.best is None:
        raise ValueError(f"every evaluation of {out} gave {task.metric} = nan (the model's predictions did not vary), "
                         "so no adapter was kept: train longer or with another learning rate, or check the labels")

    adapter = describe_adapter(out / "adapter")
    results = {
        "method": cfg.method,
        "task": task.name,
        "model": cfg.model,
        "seed": cfg.seed,
        "metric_name": task.metric,
        "metric": keep_best.best["metric"],
        "best_step": keep_best.best["step"],
        "eval_history": _eval_history(trainer.state.log_history),
        "scores": keep_best.best["scores"],
        "majority_baseline": None if generation else majority_baseline(data["train"]["label"], data["validation"]["label"],
                                                                       task.metric),
        "lora_parameters": lora_parameter_count(peft_model),
        "trainable_parameters": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        "adapter_bytes": adapter["bytes_on_disk"],
        "plan": asdict(plan),
        "train_examples": len(tokenized["train"]),
        "validation_examples": len(tokenized["validation"]),
        "steps": trainer.state.global_step,
        "resumed_from": checkpoint,
        "timings": {"probe_seconds": probe_seconds, "train_seconds": train_seconds,
                    "total_seconds": time.perf_counter() - start},
        "versions": _versions(),
        "device": str(peft_model.device),
        "liger": liger,
    }
    if generation:
        results.update(base_model_scores=base_scores, length_report=tokenized.length_report,
                       generation_eval_examples=min(cfg.generation_eval_examples, len(data["validation"])))
    if _is_main():
        write_json(results, results_file)
    return results


def _eval_history(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Every evaluation's step and scores (the learning curve; a resumed run's includes the evaluations
    before the kill, which the Trainer restores from the checkpoint)."""
    return [{"step": entry["step"], **{k.removeprefix("eval_"): v for k, v in entry.items() if k.startswith("eval_")}}
            for entry in log_history if "eval_metric" in entry]


def _base_scores(gen_metric: _GenerationMetric, model: Any, out: Path, source: Path | None) -> dict[str, float]:
    """The base model's score before fine-tuning (the floor a generation run has to beat), kept in
    ``base_scores.json`` so a resumed run does not generate again; taken from ``source``'s
    ``base_scores.json`` when given."""
    record = out / "base_scores.json"
    if record.exists():
        return json.loads(record.read_text())
    if source is not None:
        if not (source / "base_scores.json").is_file():
            raise ValueError(f"{source} has no base_scores.json: give a generation run directory that scored its "
                             "base model")
        scores = json.loads((source / "base_scores.json").read_text())
    else:
        scores = gen_metric.score(model)
    if _is_main():
        write_json(scores, record)
    return scores


def probe(cfg: RunConfig) -> dict[str, Any]:
    """LoRA-drop's stage 1 alone: probe, plan, heatmap and histograms in ``cfg.output_dir`` (locked
    against a second process, like a run directory)."""
    out = Path(cfg.output_dir)
    run_dir.check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    with run_dir.exclusive_lock(out / run_dir.LOCK_FILE, out) if _is_main() else contextlib.nullcontext():
        set_seed(cfg.seed)
        _, _, model, tokenizer, tokenized, ld_cfg = _prepare(cfg)
        return _probe_and_record(model, tokenized["train"], tokenizer, cfg, ld_cfg, out)


# -- the demo ------------------------------------------------------------------------------------
DEMO_METHODS = ("lora", "lora-drop", "droplora", "lora-drop+droplora")


@dataclass(frozen=True)
class DemoBudget:
    """What the demo runs on one task, sized for a 2-core CPU: every method gets the same model,
    training examples, steps, batch, learning rate and length, and LoRA-drop's probe trains
    ``probe_epochs`` over 10 % of the training examples."""

    model: str
    steps: int
    train_examples: int
    batch_size: int
    learning_rate: float
    max_length: int
    probe_epochs: float = 3.0
    max_new_tokens: int = 256  # generation tasks: a cap on each validation answer
    generation_eval_examples: int = 50  # generation tasks: validation prompts answered


# rotten-tomatoes: 120 steps of 6,400 critic snippets took 12 min of runs on the 2-core machine.
# bbc-headlines: a SmolLM2 step of batch 8 (about 80 tokens each) costs ~10 s of one core and answering
# the 100 validation leads (<= 16 new tokens) about a minute, so the base score, a one-epoch probe of 64
# examples and 12 steps per method took 1,250 core-seconds (benchmarks/results/demo_llm_cpu/README.md).
DEMO_BUDGETS = {
    "rotten-tomatoes": DemoBudget("minilm", steps=120, train_examples=6400, batch_size=32, learning_rate=1e-3,
                                  max_length=48),
    "bbc-headlines": DemoBudget("smollm2", steps=12, train_examples=640, batch_size=8, learning_rate=2e-3,
                                max_length=128, probe_epochs=1.0, max_new_tokens=16, generation_eval_examples=60),
}


def _demo_budget(task: str) -> DemoBudget:
    if task not in DEMO_BUDGETS:
        raise ValueError(f"the demo has no budget for task {task!r}; demo tasks: {', '.join(DEMO_BUDGETS)}")
    return DEMO_BUDGETS[task]


def demo_config(out: Path, method: str, seed: int, task: str = "rotten-tomatoes", steps: int | None = None,
                train_examples: int | None = None) -> RunConfig:
    """One method's run of the demo on ``task`` (``DEMO_BUDGETS``; ``steps`` and ``train_examples``
    override the budget's). A generation task is evaluated once, at the end: on a CPU answering the
    validation prompts costs as much as several training steps."""
    budget = _demo_budget(task)
    steps = steps or budget.steps
    generation = get_task(task).label_kind == "generation"
    lora = replace(run_lora_defaults(), seed=seed, probe_epochs=budget.probe_epochs,
                   probe_batch_size=min(budget.batch_size, run_lora_defaults().probe_batch_size))
    return RunConfig(output_dir=str(out / f"{method}-seed{seed}"), method=method, task=task, model=budget.model,
                     max_train_examples=train_examples or budget.train_examples, max_steps=steps,
                     eval_steps=steps if generation else max(1, steps // 3), batch_size=budget.batch_size,
                     learning_rate=budget.learning_rate, max_length=budget.max_length,
                     max_new_tokens=budget.max_new_tokens, generation_eval_examples=budget.generation_eval_examples,
                     lora=lora)


def run_demo(out: Path, task: str = "rotten-tomatoes", steps: int | None = None, train_examples: int | None = None,
             seed: int = 0, methods: tuple[str, ...] = DEMO_METHODS) -> list[dict[str, Any]]:
    """Runs each method (resuming finished or killed ones), writes ``out/report`` (results table,
    importance heatmap, output-norm histograms) and returns one results row per method. The later
    LoRA-drop variants reuse the first one's probe, and on a generation task every run after the
    first reuses its score of the base model."""
    probe_dir: Path | None = None
    first_dir: Path | None = None
    rows = []
    for method in methods:
        cfg = demo_config(out, method, seed, task, steps, train_examples)
        results = run(cfg, importance_from=probe_dir, base_scores_from=first_dir)
        if METHODS[method][0] is not None and probe_dir is None:
            probe_dir = Path(cfg.output_dir)  # the later LoRA-drop variants reuse this probe
        first_dir = first_dir or Path(cfg.output_dir)
        rows.append(results)
    _write_demo_report(out / "report", rows, probe_dir)
    return rows


def summary_row(results: dict[str, Any]) -> dict[str, Any]:
    """The columns a person compares runs by, and the floor the metric has to beat: ``majority``
    (always answering the most common class) for a classifier, ``base`` (the base model's score
    before fine-tuning) for a generation run."""
    retained = sum(len(v) for v in results["plan"]["retained"].values())
    sites = sum(len(v) for v in results["plan"]["layers"].values())
    row = {"method": results["method"], "task": results["task"], "seed": results["seed"],
           "sites_kept": f"{retained}/{sites}", "lora_params": results["lora_parameters"],
           "adapter_bytes": results["adapter_bytes"], "metric": results["metric"]}
    if results.get("base_model_scores") is not None:
        return {**row, "base": results["base_model_scores"]["metric"]}
    return {**row, "majority": results["majority_baseline"]}


def _write_demo_report(report: Path, rows: list[dict[str, Any]], probe_dir: Path | None) -> None:
    table = results_table([summary_row(r) for r in rows])
    atomic_write_bytes(report / "results.md", (table + "\n").encode())
    write_json(rows, report / "results.json")
    for figure in ("importance_heatmap.png", "output_norms.png"):  # the probe run drew them already
        if probe_dir is not None and (probe_dir / figure).exists():
            atomic_write_bytes(report / figure, (probe_dir / figure).read_bytes())
