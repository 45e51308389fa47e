"""The runner: method mapping, validation, resume after a kill (tiny model, real bundled data and
tokenizer)."""

import json
from dataclasses import replace

import pytest
from transformers import Trainer

import loradrop.training as training
from conftest import save_tiny_bert_dir
from conftest import tiny_bert
from loradrop import apply_plan, select
from loradrop.config import RunConfig, run_lora_defaults
from loradrop.rank_dropout import rank_dropout_of
from loradrop.sharing import summary_rows
from loradrop.training import _KeepBest, _training_args, demo_config, run


IMPORTANCE = {"query": {0: 0.5, 1: 0.3, 2: 0.15, 3: 0.05}}  # T = 0.9 keeps 3 layers


@pytest.mark.parametrize("method,roles,mask", [
    ("lora", "RRRR", None), ("lora-drop", "RRRS", None), ("droplora", "RRRR", 0.5),
    ("lora-drop+droplora", "RRRS", 0.5), ("inverse", "SRRR", None), ("inverse-share", "SSSR", None),
    ("top-k", "SRRR", None), ("no-share", "RRRD", None)])
def test_each_method_builds_its_model(tmp_path, method, roles, mask):
    """What a method does to a model: which sites keep, share or lose their LoRA, and the rank mask."""
    cfg = RunConfig.from_options({"output_dir": str(tmp_path), "method": method, "target_modules": "query", "r": 2})
    ld_cfg = cfg.loradrop_config()
    model = apply_plan(tiny_bert(), select(IMPORTANCE, ld_cfg), ld_cfg)
    assert "".join(row["role"][0].upper() for row in summary_rows(model)) == roles
    assert (rank_dropout_of(model).p if rank_dropout_of(model) else None) == mask


@pytest.mark.parametrize("options,message", [
    ({"method": "lora-plus"}, "method='lora-plus' is invalid"), ({"epochs": 0}, "epochs=0"),
    ({"max_steps": 0}, "max_steps=0"), ({"batch_size": 0}, "batch_size=0"), ({"threshold": 2.0}, "threshold=2.0"),
    ({"threshold": float("nan"), "method": "lora"}, "threshold=nan"), ({"learning_rate": float("inf")}, "learning_rate=inf"),
    ({"rank_dropout": 1.0}, "rank_dropout=1.0"), ({"fast_path": "no"}, "fast_path='no'"),
    ({"method": "droplora", "rank_dropout": 0.0}, "rank_dropout=0.0"), ({"target_modules": ",,"}, "target_modules=',,'")])
def test_run_config_validation(tmp_path, options, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(")):
        RunConfig.from_options({"output_dir": str(tmp_path), **options})


def test_run_config_round_trips_through_json(tmp_path):
    cfg = RunConfig.from_options({"output_dir": str(tmp_path), "method": "droplora", "r": 4, "seed": 3,
                                  "target_modules": "query,value", "label_column": "y"})
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert (cfg.label_column, cfg.lora.label_column, cfg.seed) == ("y", None, 3)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_bert_dir(tmp_path_factory.mktemp("tiny-bert"), layers=2)


def tiny_run(out, model_dir, **kw):
    return RunConfig.from_options(dict(output_dir=str(out), model=model_dir, max_train_examples=96, max_steps=6,
                                       eval_steps=2, batch_size=16, max_length=24, probe_max_steps=2,
                                       show_progress=False, **kw))


def test_killed_run_resumes_from_its_checkpoint_and_probe(tmp_path, tiny_model_dir, monkeypatch):
    cfg = tiny_run(tmp_path / "run", tiny_model_dir, method="lora-drop+droplora")
    real_step = Trainer.training_step
    calls = {"n": 0}

    def killed_at_step_4(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(Trainer, "training_step", real_step)
    assert not (tmp_path / "run" / "results.json").exists()
    importance = (tmp_path / "run" / "importance.json").read_text()

    def no_second_probe(*args, **kwargs):
        raise AssertionError("the resumed run probed again")

    monkeypatch.setattr(training, "evaluate_importance", no_second_probe)
    results = run(cfg)
    assert results["resumed_from"].endswith("checkpoint-2")
    assert results["steps"] == 6
    assert (tmp_path / "run" / "importance.json").read_text() == importance
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved == results and run(cfg) == results  # a finished run is not run again
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert results["metric"] == best["metric"] and 0 <= results["metric"] <= 1
    # the learning curve spans the kill: evaluations before it come back from the checkpoint
    assert [e["step"] for e in results["eval_history"]] == [2, 4, 6]
    assert max(e["metric"] for e in results["eval_history"]) == results["metric"]
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["loradrop"]["rank_dropout"]["p"] == 0.5
    assert config["loradrop"]["plan"] == results["plan"]


def test_plain_lora_run_keeps_every_site_and_reuse_of_a_probe(tmp_path, tiny_model_dir):
    plain = run(tiny_run(tmp_path / "lora", tiny_model_dir, method="lora"))
    assert plain["plan"]["retained"] == plain["plan"]["layers"] == {"query": [0, 1], "value": [0, 1]}
    assert plain["timings"]["probe_seconds"] == 0.0
    assert plain["lora_parameters"] == 4 * 8 * (32 + 32)
    first = run(tiny_run(tmp_path / "drop", tiny_model_dir, method="lora-drop", threshold=0.5))
    inverse = run(tiny_run(tmp_path / "inv", tiny_model_dir, method="inverse", threshold=0.5),
                  importance_from=tmp_path / "drop")
    assert inverse["timings"]["probe_seconds"] == 0.0
    assert inverse["plan"]["importance"] == first["plan"]["importance"]
    for t in ("query", "value"):
        assert len(inverse["plan"]["retained"][t]) == len(first["plan"]["retained"][t])


def test_a_nan_metric_never_replaces_the_best_adapter(tmp_path):
    keep = _KeepBest(tmp_path)
    keep.best = {"metric": 0.5, "step": 1, "scores": {}}
    keep.on_evaluate(None, None, None, metrics={"eval_metric": float("nan")}, model=None)  # would fail to save None
    assert keep.best["metric"] == 0.5 and not (tmp_path / "adapter").exists()


def test_extra_training_arguments_override_the_defaults(tmp_path):
    args = _training_args(RunConfig(output_dir=str(tmp_path), extra={"seed": 5, "warmup_steps": 7}), tmp_path, 10)
    assert (args.seed, args.warmup_steps, args.eval_steps) == (5, 7, 10)


def test_demo_budgets(tmp_path):
    # make demo's runs are the ones before --task existed, so their run directories still resume
    assert demo_config(tmp_path, "lora-drop", seed=0) == RunConfig(
        output_dir=str(tmp_path / "lora-drop-seed0"), method="lora-drop", task="rotten-tomatoes", model="minilm",
        max_train_examples=6400, max_steps=120, eval_steps=40, batch_size=32, learning_rate=1e-3, max_length=48,
        lora=replace(run_lora_defaults(), seed=0))
    llm = demo_config(tmp_path, "droplora", seed=1, task="bbc-headlines", steps=6)
    assert (llm.model, llm.max_steps, llm.eval_steps, llm.batch_size, llm.max_new_tokens) == ("smollm2", 6, 6, 8, 16)
    assert (llm.lora.probe_epochs, llm.lora.probe_batch_size, llm.lora.seed) == (1.0, 8, 1)
    with pytest.raises(ValueError, match="no budget for task 'tweet-sentiment'"):
        demo_config(tmp_path, "lora", seed=0, task="tweet-sentiment")


def test_checkpointing_args_take_the_name_this_transformers_knows(tmp_path, monkeypatch):
    import dataclasses

    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **training._checkpointing_args(True))
    prefix = "activation" if hasattr(args, "activation_checkpointing") else "gradient"
    assert getattr(args, f"{prefix}_checkpointing") is True
    assert getattr(args, f"{prefix}_checkpointing_kwargs") == {"use_reentrant": False}

    @dataclasses.dataclass
    class Before524:  # transformers 5.17's TrainingArguments knows only the old name
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None

    monkeypatch.setattr(training, "TrainingArguments", Before524)
    assert training._checkpointing_args(False) == {"gradient_checkpointing": False,
                                                   "gradient_checkpointing_kwargs": {"use_reentrant": False}}
