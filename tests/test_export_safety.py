"""Issue 15, cases 1, 4 (export target), 5f and 6 (leftovers, quiet export): what an adapter or export
write may replace, one writer per target, damaged adapter configs. The command-line cases run the real
``python -m loradrop.cli`` in subprocesses."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import loradrop
from conftest import randomize_lora, tiny_bert
from loradrop import LoraDropConfig, Plan, apply_plan, export_peft, load_adapter, save_adapter
from loradrop.adapter_io import CONFIG_FILE, is_loradrop_output
from loradrop.cli import app

SRC = str(Path(loradrop.__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def model():
    cfg = LoraDropConfig(target_modules=["query", "value"], r=4)
    plan = Plan(layers={"query": [0, 1, 2, 3], "value": [0, 1, 2, 3]}, retained={"query": [1], "value": [0, 2]})
    m = apply_plan(tiny_bert(), plan, cfg)
    randomize_lora(m)
    return m


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A compact adapter whose recorded base model is a saved tiny BERT folder."""
    root = tmp_path_factory.mktemp("export")
    base = root / "base"
    tiny_bert().save_pretrained(base)
    m = model()
    m.peft_config["default"].base_model_name_or_path = str(base)
    return save_adapter(m, root / "run" / "adapter")


def tree(path):
    """Every file under ``path`` with its bytes: what must survive a refused command untouched."""
    path = Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def cli(*args, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "loradrop.cli", *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def one_line(err, message):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    return lines[0]


# -- case 1: export never replaces what loradrop did not write --------------------------------------
def test_export_refuses_what_it_did_not_write_and_force_is_bounded(tmp_path, adapter):
    """All cases at once, each a real `loradrop export` process (run side by side to keep it fast)."""
    user_dir = tmp_path / "notes"
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("years of work")
    plain_file = tmp_path / "out.txt"
    plain_file.write_text("keep me")
    forced_dir = tmp_path / "forced"
    forced_dir.mkdir()
    (forced_dir / "old.txt").write_text("replace me")
    forced_file = tmp_path / "forced.txt"
    forced_file.write_text("replace me too")
    run = adapter.parent
    run_before, adapter_before = tree(run), tree(adapter)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "mine.txt").write_text("cwd file")
    procs = {
        "user_dir": cli("export", adapter, user_dir),
        "plain_file": cli("export", adapter, plain_file),
        "run_dir": cli("export", adapter, run, "--force"),
        "source": cli("export", adapter, adapter, "--force"),
        "cwd": cli("export", adapter, ".", "--force", cwd=cwd),
        "cwd_parent": cli("export", adapter, "..", "--force", cwd=cwd),
        "forced_dir": cli("export", adapter, forced_dir, "--force"),
        "forced_file": cli("export", adapter, forced_file, "--force"),
        "fresh": cli("export", adapter, tmp_path / "peft"),
    }
    results = {name: finish(p) for name, p in procs.items()}

    code, _, err = results["user_dir"]
    assert code == 2 and "not an adapter loradrop wrote; pass --force to replace it" in one_line(err, str(user_dir))
    assert tree(user_dir) == {"thesis.tex": b"years of work"}
    code, _, err = results["plain_file"]
    assert code == 2 and "is a file, not a loradrop adapter; pass --force" in one_line(err, str(plain_file))
    assert plain_file.read_text() == "keep me"
    for name in ("run_dir", "source"):  # an ancestor of the source, or the source: never, even with --force
        code, _, err = results[name]
        assert code == 2, (name, err)
        one_line(err, "the source")
    assert tree(run) == run_before and tree(adapter) == adapter_before
    for name in ("cwd", "cwd_parent"):  # the current directory and its ancestors: never
        code, _, err = results[name]
        assert code == 2, (name, err)
        one_line(err, "it is the current directory or holds it")
    assert tree(cwd) == {"mine.txt": b"cwd file"}
    assert not [p.name for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]
    for name in ("forced_dir", "forced_file", "fresh"):
        code, out, err = results[name]
        assert code == 0, (name, err)
    assert is_loradrop_output(forced_dir) and is_loradrop_output(forced_file) and forced_file.is_dir()
    assert "old.txt" not in tree(forced_dir)
    fresh = tmp_path / "peft"
    config = json.loads((fresh / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and "loradrop" not in config  # still plain PEFT

    # an export written earlier, and a compact adapter, are recognised and replaced without --force
    code, _, err = finish(cli("export", adapter, fresh))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no lock, tmp or old left


def test_save_adapter_and_export_peft_share_the_rule(tmp_path):
    m = model()
    user_dir = tmp_path / "docs"
    user_dir.mkdir()
    (user_dir / "a.txt").write_text("mine")
    for write in (save_adapter, export_peft):
        with pytest.raises(ValueError, match="not an adapter loradrop wrote; pass overwrite=True to replace it"):
            write(m, user_dir)
        assert tree(user_dir) == {"a.txt": b"mine"}
    save_adapter(m, tmp_path / "a")
    save_adapter(m, tmp_path / "a")  # its own earlier adapter: replaced
    export_peft(m, tmp_path / "a")  # an adapter loradrop wrote: replaced by an export
    export_peft(m, tmp_path / "a")  # an export loradrop wrote: replaced
    assert is_loradrop_output(tmp_path / "a")
    (tmp_path / "a" / "notes.txt").write_text("added by a person")
    with pytest.raises(ValueError, match="not an adapter loradrop wrote"):
        save_adapter(m, tmp_path / "a")  # no longer only what loradrop wrote
    save_adapter(m, user_dir, overwrite=True)
    assert load_adapter(tiny_bert(), user_dir) is not None
    (tmp_path / "empty").mkdir()
    save_adapter(m, tmp_path / "empty")  # an empty directory holds nothing to lose
    old_cwd = os.getcwd()
    os.chdir(tmp_path / "empty")
    try:
        with pytest.raises(ValueError, match="current directory"):
            save_adapter(m, ".", overwrite=True)
        with pytest.raises(ValueError, match="current directory"):
            export_peft(m, tmp_path, overwrite=True)
    finally:
        os.chdir(old_cwd)
    assert tree(tmp_path / "empty") != {}


# -- case 4: one writer per export target -----------------------------------------------------------
HOLD = ("import sys, time\nfrom loradrop.run_dir import exclusive_lock, target_lock\n"
        "lock = target_lock(sys.argv[2]) if sys.argv[1] == 'target' else exclusive_lock(sys.argv[2] + '/.loradrop.lock', sys.argv[2])\n"
        "lock.__enter__()\nprint('locked', flush=True)\ntime.sleep(300)\n")


def hold_lock(kind, path):
    """A real process holding the lock ``loradrop`` takes on ``path``, as a running export or run would."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(path)], env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_export_target_in_use_by_another_process(tmp_path, adapter):
    out = tmp_path / "peft"
    holder = hold_lock("target", out)
    try:
        code, _, err = finish(cli("export", adapter, out))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert code == 2
    one_line(err, f"{out} is in use by pid {holder.pid}")
    assert not out.exists()
    code, _, err = finish(cli("export", adapter, out))  # the holder was killed: its lock died with it
    assert code == 0, err


# -- case 6: leftovers of killed writes; a quiet export ---------------------------------------------
def test_leftovers_of_killed_writes_are_cleaned_on_the_next_write(tmp_path):
    m = model()
    target = save_adapter(m, tmp_path / "adapter")
    (tmp_path / ".adapter.tmp-abcd_123").mkdir()  # a kill during a write
    (tmp_path / ".adapter.tmp-abcd_123" / CONFIG_FILE).write_text("{}")
    (tmp_path / ".adapter.old-zz99yy88" / "previous").mkdir(parents=True)  # a kill while replacing
    (tmp_path / ".adapter.tmp-not-ours").mkdir()  # not a name loradrop makes: left alone
    (tmp_path / ".other.tmp-abcd_123").mkdir()  # another target's: left alone
    save_adapter(m, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".adapter.tmp-not-ours", ".other.tmp-abcd_123", "adapter"]


def test_a_kill_between_the_two_renames_puts_the_previous_adapter_back(tmp_path):
    m = model()
    target = save_adapter(m, tmp_path / "adapter")
    before = tree(target)
    aside = tmp_path / ".adapter.old-abcdefgh"
    aside.mkdir()
    os.replace(target, aside / "previous")  # killed here: no adapter in place
    export_peft(m, tmp_path / "other")  # another target: this one's leftovers stay
    assert aside.exists()
    from loradrop.adapter_io import _clean_stale  # what the next write to this target does first

    _clean_stale(target)
    assert tree(target) == before and not aside.exists()
    save_adapter(m, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "other"]


def test_export_errors_are_one_line_without_the_load_report(tmp_path, adapter):
    from transformers import BertConfig, BertModel

    other = tmp_path / "other-base"  # a headless 2-layer BERT: transformers reports the missing head
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48)).save_pretrained(other)
    code, out, err = finish(cli("export", adapter, tmp_path / "peft", "--base-model", other))
    assert code == 2
    one_line(err, "num_hidden_layers=4")
    assert "LOAD REPORT" not in out + err and not (tmp_path / "peft").exists()


# -- case 5f: a damaged loradrop section -------------------------------------------------------------
@pytest.mark.parametrize("change,message", [
    (lambda s: s["rank_dropout"].__setitem__("extra", 1), "loradrop.rank_dropout in adapter_config.json is unreadable"),
    (lambda s: s.__setitem__("shared", ["query"]), "loradrop.shared in adapter_config.json is a list"),
    (lambda s: s.__setitem__("shared", {"query": "x"}), "loradrop.shared['query'] in adapter_config.json is not a list"),
    (lambda s: s.__setitem__("config", 3), "loradrop.config in adapter_config.json is a int"),
])
def test_damaged_loradrop_section_is_a_clear_error(tmp_path, change, message):
    m = loradrop.add_rank_dropout(model(), 0.3)
    path = save_adapter(m, tmp_path / "a")
    config = json.loads((path / CONFIG_FILE).read_text())
    change(config["loradrop"])
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message.replace("[", "\\[")):
        load_adapter(tiny_bert(), path)
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2
    one_line(result.stderr, message)
