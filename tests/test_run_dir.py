"""Issue 15, cases 2, 3, 4 (runs), 5e, 6 (accepted-then-wrong settings, leftovers of failed runs) and
7a: a run directory is resumed only by its own run, from its newest complete checkpoint, by one
process at a time. Tiny model, real bundled data and tokenizer, as tests/test_training.py."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer
from typer.testing import CliRunner

import loradrop
import loradrop.training as training
from conftest import save_tiny_bert_dir
from loradrop.cli import app
from loradrop.run_dir import LOCK_FILE, PARTIAL_DIR, checkpoint_problem, newest_complete_checkpoint
from loradrop.config import RunConfig
from loradrop.training import run

SRC = str(Path(loradrop.__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
TINY = dict(max_train_examples=96, max_steps=6, eval_steps=2, batch_size=16, max_length=24, probe_max_steps=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_bert_dir(tmp_path_factory.mktemp("tiny-bert"), layers=2)


def tiny_run(out, model_dir, **kw):
    return RunConfig.from_options(dict(output_dir=str(out), model=model_dir, show_progress=False, **{**TINY, **kw}))


def cli_args(out, model_dir, **kw):
    """The command line of ``tiny_run``."""
    options = {**TINY, "model": model_dir, **kw}
    return ["train", "--out", str(out), *[a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]]


def invoke(args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(err, message):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    return lines[0]


def tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory):
    """A finished lora-drop run."""
    out = tmp_path_factory.mktemp("finished") / "run"
    results = run(tiny_run(out, model_dir, method="lora-drop"))
    return out, results


# -- case 2: a rerun resumes only the run its run_config.json describes ---------------------------
def test_another_method_on_a_finished_run_is_refused(finished, model_dir):
    out, results = finished
    before = tree(out)
    result = invoke(cli_args(out, model_dir, method="lora"))
    assert result.exit_code == 2, result.output
    one_line(result.stderr, f"{out} holds another run (method 'lora-drop' there, 'lora' now): rerun with the same "
                            "settings to resume it, or pick another --out")
    result = invoke(cli_args(out, model_dir, method="lora-drop", seed=1, learning_rate=0.002))
    assert result.exit_code == 2
    one_line(result.stderr, "learning_rate 0.001 there, 0.002 now; lora.seed 0 there, 1 now")
    assert tree(out) == before
    # the same run again: the finished results, whatever the progress bars
    assert run(dataclasses.replace(tiny_run(out, model_dir, method="lora-drop"), show_progress=True)) == results


def test_settings_that_do_not_change_results_may_change():
    from loradrop.run_dir import run_config_differences

    stored = {"method": "lora", "show_progress": True, "output_dir": "a", "extra": {"warmup_steps": [1], "logging_steps": 3}}
    assert run_config_differences(stored, {**stored, "show_progress": False, "output_dir": "b",
                                           "extra": {"warmup_steps": (1,), "logging_steps": 9}}) == []
    assert run_config_differences(stored, {**stored, "extra": {"warmup_steps": [2]}}) == [
        "extra {'warmup_steps': [1]} there, {'warmup_steps': [2]} now"]


def test_run_files_without_a_run_config_are_not_resumed(tmp_path, model_dir):
    (tmp_path / "run" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds run files \\(checkpoints\\) but no run_config.json"):
        run(tiny_run(tmp_path / "run", model_dir))


# -- case 3: a kill while the Trainer saves a checkpoint --------------------------------------------
def test_a_kill_during_a_checkpoint_save_resumes_from_the_previous_one(tmp_path, model_dir, monkeypatch):
    method = "lora-drop+droplora"  # rank-dropout masks too: the random state must be restored
    full = run(tiny_run(tmp_path / "full", model_dir, method=method))
    assert full["resumed_from"] is None

    out = tmp_path / "killed"
    cfg = tiny_run(out, model_dir, method=method)
    real_save_rng = Trainer._save_rng_state

    def killed_while_saving_4(self, output_dir):
        if self.state.global_step == 4:  # weights, optimizer.pt and scheduler.pt written; rng and state not
            raise KeyboardInterrupt("killed")
        return real_save_rng(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", killed_while_saving_4)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.undo()
    partial = out / "checkpoints" / "checkpoint-4"
    optimizer = partial / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])  # and cut short mid-write
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert checkpoint_problem(partial) == "trainer_state.json is missing or unreadable"

    # case 2 on an unfinished run: another seed does not resume this checkpoint
    with pytest.raises(ValueError, match="holds another run \\(lora.seed 0 there, 1 now\\)"):
        run(tiny_run(out, model_dir, method=method, seed=1))

    resumed = run(cfg)
    assert resumed["resumed_from"] == str(out / "checkpoints" / "checkpoint-2")
    assert resumed["steps"] == 6
    aside = list((out / PARTIAL_DIR).iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("checkpoint-4.partial-")  # set aside, not deleted
    assert (aside[0] / "optimizer.pt").exists()
    for name in ("checkpoints/checkpoint-6/adapter_model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(out / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    assert resumed["metric"] == pytest.approx(full["metric"])


def test_every_file_of_a_checkpoint_is_checked(tmp_path, finished):
    out, _ = finished
    complete = out / "checkpoints" / "checkpoint-6"
    assert checkpoint_problem(complete) is None
    for name, damage in [("trainer_state.json", "remove"), ("adapter_model.safetensors", "truncate"),
                         ("adapter_model.safetensors", "remove"), ("optimizer.pt", "remove"), ("scheduler.pt", "truncate"),
                         ("rng_state.pth", "truncate"), ("rng_state.pth", "remove")]:
        root = tmp_path / f"{name}-{damage}" / "checkpoints"
        shutil.copytree(complete, root / "checkpoint-6")
        shutil.copytree(complete, root / "checkpoint-8")  # the newer one is damaged
        state = json.loads((root / "checkpoint-8" / "trainer_state.json").read_text())
        (root / "checkpoint-8" / "trainer_state.json").write_text(json.dumps({**state, "global_step": 8}))
        file = root / "checkpoint-8" / name
        if damage == "remove":
            file.unlink()
        else:
            file.write_bytes(file.read_bytes()[:-10])
        assert checkpoint_problem(root / "checkpoint-8") is not None, (name, damage)
        assert newest_complete_checkpoint(root) == str(root / "checkpoint-6"), (name, damage)
        assert not (root / "checkpoint-8").exists() and len(list((root.parent / PARTIAL_DIR).iterdir())) == 1


# -- case 4: one process per run directory ----------------------------------------------------------
HOLD = ("import sys, time\nfrom loradrop.run_dir import exclusive_lock\n"
        "lock = exclusive_lock(sys.argv[1] + '/.loradrop.lock', sys.argv[1])\nlock.__enter__()\n"
        "print('locked', flush=True)\ntime.sleep(300)\n")


def test_a_second_process_on_one_run_directory_exits_2(tmp_path, model_dir):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "loradrop.cli", *cli_args(out, model_dir, max_steps=400,
                                                                                eval_steps=200)],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ((out / LOCK_FILE).exists() and (out / LOCK_FILE).read_text().strip()):
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "timeout"
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "-m", "loradrop.cli", *cli_args(out, model_dir, max_steps=400,
                                                                                   eval_steps=200)],
                                env=ENV, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second one started: make it longer"
    finally:
        first.send_signal(signal.SIGKILL)  # a kill: its lock dies with it
        first.wait()
    assert second.returncode == 2
    one_line(second.stderr, f"{out} is in use by pid {first.pid}")

    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:  # the killed run's lock file is still there, but no process holds it
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(loradrop.run_dir.DirectoryInUse, match=f"in use by pid {holder.pid}"):
            run(tiny_run(out, model_dir, max_steps=400, eval_steps=200))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# -- case 5e and 6: settings and paths refused before anything is written ---------------------------
@pytest.mark.parametrize("extra,message", [
    (["--learning-rate", "inf"], "learning_rate=inf is invalid: must be a finite number > 0"),
    (["--epochs", "inf"], "epochs=inf is invalid"),
    (["--method", "lora", "--threshold", "nan"], "threshold=nan is invalid"),
    (["--target-modules", ",,"], "target_modules=',,' is invalid"),
    (["--target-modules", ""], "target_modules='' is invalid"),
])
def test_settings_accepted_then_wrong_are_refused(tmp_path, extra, message):
    result = invoke(["train", "--out", tmp_path / "run", *extra])
    assert result.exit_code == 2, result.output
    one_line(result.stderr, message)
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    result = invoke(["train", "--out", file])
    assert result.exit_code == 2
    one_line(result.stderr, f"--out {file} exists and is not a directory")
    assert file.read_text() == "mine"


def test_a_failed_start_leaves_no_run_config(tmp_path, model_dir):
    (tmp_path / "d.csv").write_text("text,y\nfine film,1\nawful,0\n")
    result = invoke(["train", "--out", tmp_path / "new", "--data", tmp_path / "d.csv", "--model", model_dir])
    assert result.exit_code == 2
    one_line(result.stderr, "column 'label' not found")
    assert not (tmp_path / "new").exists()  # it created the directory: gone again
    (tmp_path / "empty").mkdir()
    result = invoke(cli_args(tmp_path / "empty", model_dir, target_modules="no_such_module"))  # fails after loading
    assert result.exit_code == 2
    assert "no_such_module" in result.stderr
    assert list((tmp_path / "empty").iterdir()) == []  # the directory was there before: kept, empty


# -- case 7a: no evaluation gave a number ------------------------------------------------------------
def test_a_run_whose_every_evaluation_is_nan_says_so(tmp_path, model_dir, monkeypatch):
    monkeypatch.setattr(training, "compute_metrics", lambda task, p, r: {"metric": float("nan")})
    with pytest.raises(ValueError, match="every evaluation of .* gave accuracy = nan .*no adapter was kept"):
        run(tiny_run(tmp_path / "run", model_dir, method="lora", max_steps=2, eval_steps=2))
    assert not (tmp_path / "run" / "results.json").exists()
