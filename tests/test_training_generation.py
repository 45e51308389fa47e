"""The causal-LM path of the runner on a tiny Llama and the offline word-level tokenizer: a
generation task from a JSONL file, LoRA-drop's probe on prompt-masked data, the generation metric
at each evaluation, the best adapter kept by it, and the base model's score in results.json."""

import json

import pytest
from conftest import save_tiny_llama_dir

from loradrop.config import RunConfig
from loradrop.sites import DEFAULT_TARGETS
from loradrop.training import run


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


def qa_file(path):
    rows = [{"q": f"what is {a} + {b} ?", "a": "the answer is 5" if (a, b) == ("2", "3") else "no"}
            for a in ("2", "3", "5") for b in ("2", "3", "5", "the", "answer", "yes", "no")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_generation_run(tmp_path, llama_dir):
    cfg = RunConfig.from_options(dict(
        output_dir=str(tmp_path / "run"), model=llama_dir, data=qa_file(tmp_path / "qa.jsonl"), prompt_column="q",
        response_column="a", generation_metric="exact_match", method="lora-drop", max_steps=4, eval_steps=2,
        batch_size=4, max_length=24, probe_max_steps=2, show_progress=False, max_new_tokens=3,
        generation_eval_examples=2, learning_rate=1e-2))
    results = run(cfg)
    assert results["metric_name"] == "exact_match" and results["majority_baseline"] is None
    assert set(results["base_model_scores"]) == {"metric", "exact_match"}
    assert results["liger"] == {"applied": [], "reason": "the model is on cpu: Liger's kernels run on CUDA only"}
    assert results["generation_eval_examples"] == 2
    # 21 distinct prompts, 2 held out; every prompt + response fits in 24 tokens
    assert results["length_report"] == {"train": {"kept": 19, "dropped": 0, "truncated": 0},
                                        "validation": {"kept": 2, "dropped": 0, "truncated": 0}}
    assert set(results["plan"]["layers"]) == set(DEFAULT_TARGETS["llama"])
    assert {"loss", "perplexity", "exact_match", "metric"} <= set(results["scores"])
    assert [e["step"] for e in results["eval_history"]] == [2, 4]
    best = next(e for e in results["eval_history"] if e["step"] == results["best_step"])
    assert best["metric"] == results["metric"] and best["loss"] == results["scores"]["loss"]
    assert (tmp_path / "run" / "adapter").is_dir() and (tmp_path / "run" / "base_scores.json").is_file()
    assert run(cfg) == results  # finished: not run again


def test_length_policy_drops_and_counts(tmp_path, llama_dir):
    cfg = RunConfig(output_dir=str(tmp_path / "run"), model=llama_dir, data=qa_file(tmp_path / "qa.jsonl"),
                    prompt_column="q", response_column="a", method="lora", max_steps=1, eval_steps=1, batch_size=4,
                    max_length=17, show_progress=False, max_new_tokens=2, generation_eval_examples=1)
    results = run(cfg)
    # a prompt is 14 tokens with the chat template; "no" <|im_end|> \n makes 17, but the one row answered
    # "the answer is 5" <|im_end|> \n makes 20 and is dropped
    dropped = results["length_report"]["train"]["dropped"] + results["length_report"]["validation"]["dropped"]
    assert dropped == 1


@pytest.mark.parametrize("field,value,message", [
    ("truncation", "cut", "truncation='cut' is invalid"), ("generation_metric", "f1", "generation_metric='f1'"),
    ("max_new_tokens", 0, "max_new_tokens=0"), ("messages_column", "m", "either prompt_column")])
def test_generation_fields_are_validated(tmp_path, field, value, message):
    kwargs = {"prompt_column": "q"} if field == "messages_column" else {}
    with pytest.raises(ValueError, match=message):
        RunConfig(output_dir=str(tmp_path), **kwargs, **{field: value})


def test_demo_on_a_generation_task_scores_the_base_model_once(tmp_path, llama_dir, monkeypatch):
    """The demo's generation path end to end on the real bbc-headlines data with a tiny Llama (two of
    the four methods, to stay fast): the base model scored by the first run only, the probe run's
    heatmap, and the base score in the report's ``base`` column."""
    from loradrop import training

    monkeypatch.setitem(training.DEMO_BUDGETS, "bbc-headlines", training.DemoBudget(
        llama_dir, steps=2, train_examples=40, batch_size=4, learning_rate=1e-2, max_length=128, probe_epochs=1.0,
        max_new_tokens=2, generation_eval_examples=3))
    scored = []
    original = training._GenerationMetric.score
    monkeypatch.setattr(training._GenerationMetric, "score",
                        lambda self, model: scored.append(1) or original(self, model))
    rows = training.run_demo(tmp_path, task="bbc-headlines", methods=("lora", "lora-drop"))
    assert [r["method"] for r in rows] == ["lora", "lora-drop"]
    assert len(scored) == 1 + len(rows)  # the base model once, then each run's one evaluation at its last step
    assert all(r["base_model_scores"] == rows[0]["base_model_scores"] for r in rows)
    assert all((r["steps"], r["best_step"], r["metric_name"]) == (2, 2, "rougeL") for r in rows)
    table = (tmp_path / "report" / "results.md").read_text()
    assert table.splitlines()[0].split("|")[-2].strip() == "base" and "majority" not in table
    assert (tmp_path / "report" / "importance_heatmap.png").is_file()
    assert json.loads((tmp_path / "report" / "results.json").read_text()) == rows


def test_base_scores_come_from_another_run_without_generating(tmp_path):
    from loradrop.training import _base_scores

    (tmp_path / "first").mkdir()
    (tmp_path / "later").mkdir()
    with pytest.raises(ValueError, match="first has no base_scores.json"):
        _base_scores(None, None, tmp_path / "later", tmp_path / "first")
    (tmp_path / "first" / "base_scores.json").write_text('{"metric": 0.25, "rougeL": 0.25}')
    # gen_metric None: generating would fail, so the scores can only come from the first run
    assert _base_scores(None, None, tmp_path / "later", tmp_path / "first") == {"metric": 0.25, "rougeL": 0.25}
    assert json.loads((tmp_path / "later" / "base_scores.json").read_text()) == {"metric": 0.25, "rougeL": 0.25}
