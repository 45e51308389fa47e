"""Two processes on the CPU (gloo), launched by torchrun: the probe's sums, the plan and the trained
adapter must match one process with the same global batch."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from conftest import cls_dataset, save_tiny_bert_dir, tiny_bert
from loradrop import LoraDropConfig, Plan, evaluate_importance
from loradrop.training import RunConfig, run

PROBE = LoraDropConfig(target_modules=["query", "value"], r=4, sample_ratio=1.0, probe_epochs=2, probe_lr=1e-2,
                       threshold=0.7, seed=0)

WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "probe":
        import dataclasses
        from conftest import cls_dataset, save_tiny_bert_dir, tiny_bert
        from test_distributed import PROBE
        from loradrop import evaluate_importance
        result = evaluate_importance(tiny_bert(), cls_dataset(48), dataclasses.replace(PROBE, probe_batch_size=4),
                                     record_examples=True)
        norms = {f"{s.module_type}.{s.layer}": len(v) for s, v in result.example_norms.items()}
        (out / f"rank{rank}.json").write_text(json.dumps({"g": result.g, "plan": result.plan.to_json(), "norms": norms}))
    else:
        from test_distributed import train_config
        from loradrop.training import run
        run(train_config(out / "run", sys.argv[4], batch_size=4), importance_from=out / "probe")
    dist.destroy_process_group()
""")


def torchrun(tmp_path, *args):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    tests = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), args[0], str(tmp_path), tests, *args[1:]], check=True, env=env, timeout=600)


def test_probe_sums_over_ranks_and_agrees_on_the_plan(tmp_path):
    torchrun(tmp_path, "probe")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = evaluate_importance(tiny_bert(), cls_dataset(48), dataclasses.replace(PROBE, probe_batch_size=8))
    assert ranks[0]["plan"] == ranks[1]["plan"]  # the same bytes: the plan check passed on every rank
    plan = Plan.from_json(ranks[0]["plan"])
    assert (plan.layers, plan.retained) == (single.plan.layers, single.plan.retained)
    assert 0 < sum(len(v) for v in plan.retained.values()) < 8  # a plan that shares something
    for t, per_layer in single.g.items():
        for layer, value in per_layer.items():
            for rank in ranks:
                assert rank["g"][t][str(layer)] == pytest.approx(value, rel=1e-4)
    assert set(ranks[0]["norms"].values()) == {48}  # every example's norm, gathered from both ranks


def train_config(out, model_dir, batch_size):
    return RunConfig(output_dir=str(out), model=model_dir, method="lora-drop", max_train_examples=64, max_steps=6,
                     eval_steps=3, batch_size=batch_size, learning_rate=1e-2, max_length=24, show_progress=False)


@pytest.fixture(scope="module")
def dropout_free_model(tmp_path_factory):
    return save_tiny_bert_dir(tmp_path_factory.mktemp("tiny-bert-ddp"), layers=3, dropout=0.0)


def test_shared_lora_trains_the_same_under_ddp(tmp_path, dropout_free_model):
    probe = tmp_path / "probe"
    probe.mkdir()
    importance = {"query": {"0": 0.05, "1": 0.9, "2": 0.05}, "value": {"0": 0.6, "1": 0.35, "2": 0.05}}
    (probe / "importance.json").write_text(json.dumps({"importance": importance}))
    torchrun(tmp_path, "train", dropout_free_model)
    single = run(train_config(tmp_path / "single", dropout_free_model, batch_size=8), importance_from=probe)
    ddp = json.loads((tmp_path / "run" / "results.json").read_text())
    assert ddp["plan"] == single["plan"] and ddp["plan"]["retained"] == {"query": [1], "value": [0, 1]}
    assert ddp["steps"] == single["steps"] == 6
    a = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and "loradrop.shared.query.lora_A.weight" in a
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it trained
    assert ddp["metric"] == pytest.approx(single["metric"])
