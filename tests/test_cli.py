"""The command line: exit codes and one-line messages on bad input, and the end-to-end run on the
bundled model."""

import json

import pytest
from typer.testing import CliRunner

import loradrop
from conftest import randomize_lora, save_tiny_bert_dir, tiny_bert
from loradrop import LoraDropConfig, Plan, apply_plan, save_adapter
from loradrop.cli import app
from loradrop.config import RunConfig, cli_fields

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_bad_input(result, message):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_version():
    result = invoke("version")
    assert result.exit_code == 0 and result.stdout.strip() == loradrop.__version__


def option_names(command):
    """The long options a command's --help lists (rich may cut a long name short with an ellipsis)."""
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    return {word.strip("│,") for word in result.stdout.split() if word.startswith("--")}


def test_train_and_importance_options_are_the_config_fields():
    """A field added to RunConfig or LoraDropConfig (with cli metadata) is an option of both commands,
    except that the probe-only command leaves out what only training uses."""
    fields = [f.name for cls in (RunConfig, LoraDropConfig) for f in cli_fields(cls)]
    flag = {name: "--out" if name == "output_dir" else "--" + name.replace("_", "-") for name in fields}
    train, importance = option_names("train"), option_names("importance")
    assert set(flag.values()) <= train and "--importance-from" in train
    training_only = {"method", "epochs", "max_steps", "batch_size", "learning_rate", "eval_steps", "reinit",
                     "rank_dropout", "rank_dropout_granularity", "rank_dropout_rescale"}
    assert {flag[n] for n in fields if n not in training_only} <= importance
    assert not {flag[n] for n in training_only} & importance


@pytest.fixture
def adapter(tmp_path):
    cfg = LoraDropConfig(target_modules=["query", "value"], r=4)
    plan = Plan(layers={"query": [0, 1, 2, 3], "value": [0, 1, 2, 3]}, retained={"query": [1], "value": [0, 2]})
    model = apply_plan(tiny_bert(), plan, cfg)
    randomize_lora(model)
    return save_adapter(model, tmp_path / "adapter")


def test_inspect(adapter):
    result = invoke("inspect", adapter)
    assert result.exit_code == 0
    assert "[0, 2, 3]" in result.stdout and "bytes on disk" in result.stdout
    info = json.loads(invoke("inspect", adapter, "--json").stdout)
    assert info["sites"]["value"] == {"retained": [0, 2], "shared": [1, 3], "dropped": []}


def test_export_onto_the_recorded_base(tmp_path, adapter):
    base = tmp_path / "base"
    tiny_bert().save_pretrained(base)
    result = invoke("export", adapter, tmp_path / "peft", "--base-model", base)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and "loradrop" not in config


@pytest.mark.parametrize("args,message", [
    (["inspect", "/nonexistent"], "adapter_config.json is missing"),
    (["export", "/nonexistent", "/tmp/x"], "adapter_config.json is missing"),
    (["train", "--out", "{tmp}/r", "--method", "lora-plus"], "method='lora-plus' is invalid"),
    (["train", "--out", "{tmp}/r", "--task", "sst-9"], "unknown task 'sst-9'"),
    (["train", "--out", "{tmp}/r", "--data", "{tmp}/missing.csv"], "missing.csv"),
    (["train", "--out", "{tmp}/r", "--data", "{tmp}/d.csv", "--label-column", "y"], "'y'"),
    (["compare", "{tmp}"], "has no results.json"),
    (["importance", "--out", "{tmp}/d.csv"], "exists and is not a directory"),
    (["train", "--out", "{tmp}/r", "--model", "{tmp}/nope"], "does not exist"),
    (["train", "--out", "{tmp}/r", "--model", "{tmp}/broken"], "is not valid JSON"),
    (["train", "--out", "{tmp}/r", "--model", "{tmp}/empty"], "holds no model"),
    (["demo", "--out", "{tmp}/demo", "--task", "gsm"], "the demo has no budget for task 'gsm'; demo tasks: "
                                                       "rotten-tomatoes, bbc-headlines"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    (tmp_path / "d.csv").write_text("text,label\nfine film,pos\nawful,neg\n")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    (tmp_path / "empty").mkdir()
    result = invoke(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert_bad_input(result, message)


def test_compare_aggregates_seeds(tmp_path):
    dirs = []
    for seed, metric in ((0, 0.80), (1, 0.84)):
        d = tmp_path / f"run{seed}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps({
            "method": "lora-drop", "task": "t", "seed": seed, "metric": metric, "majority_baseline": 0.5,
            "lora_parameters": 100, "adapter_bytes": 1000,
            "plan": {"layers": {"q": [0, 1]}, "retained": {"q": [1]}}}))
        dirs.append(d)
    result = invoke("compare", *dirs)
    assert result.exit_code == 0, result.output
    assert "0.82 ± 0.02828" in result.stdout or "0.8200 ± 0.0283" in result.stdout, result.stdout


@pytest.mark.slow
def test_end_to_end_on_the_bundled_model(tmp_path):
    """A small real run: MiniLM + rotten-tomatoes, LoRA-drop with DropLoRA, through the CLI."""
    out = tmp_path / "run"
    result = invoke("train", "--out", out, "--method", "lora-drop+droplora", "--max-train-examples", 1600,
                    "--max-steps", 100, "--eval-steps", 50, "--max-length", 40, "--probe-max-steps", 20,
                    "--learning-rate", 2e-3)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] > results["majority_baseline"] + 0.05, results["scores"]
    for png in ("importance_heatmap.png", "output_norms.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    inspect = json.loads(invoke("inspect", out / "adapter", "--json").stdout)
    assert inspect["bytes_on_disk"] == results["adapter_bytes"]


def test_importance_command_probes_and_draws(tmp_path):
    model = save_tiny_bert_dir(tmp_path / "model", layers=3)
    out = tmp_path / "probe"
    result = invoke("importance", "--out", out, "--model", model, "--max-train-examples", 200, "--max-length", 24,
                    "--probe-max-steps", 3, "--threshold", 0.8)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "importance.json").read_text())
    assert record["probe_steps"] == 3 and record["sample_size"] == 20
    for t in ("query", "value"):
        assert sum(record["importance"][t].values()) == pytest.approx(1.0)
    assert record["plan"]["threshold"] == 0.8
    assert (out / "importance_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert "LoRA importance (T = 0.8)" in result.stdout
