"""LoRA-drop + DropLoRA under FSDP2 (``fully_shard``) on two CPU processes (gloo), launched once by
torchrun, against references computed here in one plain process: the loss, every LoRA's gradient,
the shared LoRA's gradient equal to the sum of its sites' gradients in an untied copy, the adapter
saved from the sharded run (shared LoRA stored once, tied again after loading, plain-PEFT export),
and the probe's sums and plan."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import VOCAB, randomize_lora, tiny_llama
from loradrop import LoraDropConfig, Plan, apply_plan, evaluate_importance, gathered_lora, load_adapter, shard_model
from loradrop.rank_dropout import add_rank_dropout
from loradrop.sites import add_lora, lora_layers

LAYERS = 4
CFG = LoraDropConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8, rank_dropout=0.5, seed=0)
# q_proj: layers 0, 2, 3 share one LoRA; v_proj: 1, 2 share; down_proj keeps every LoRA
PLAN = Plan(layers={t: list(range(LAYERS)) for t in ("down_proj", "q_proj", "v_proj")},
            retained={"down_proj": [0, 1, 2, 3], "q_proj": [1], "v_proj": [0, 3]}, threshold=0.9)
SHARED = {"q_proj": [0, 2, 3], "v_proj": [1, 2]}
PROBE = LoraDropConfig(target_modules=["q_proj", "v_proj"], r=4, sample_ratio=1.0, probe_epochs=2, probe_lr=1e-2,
                       threshold=0.7, seed=0)
LR = 0.1


def batch(rows: slice = slice(None)) -> dict:
    ids = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(5))[rows]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def probe_data() -> list[dict]:
    ids = torch.randint(0, VOCAB, (16, 8), generator=torch.Generator().manual_seed(6)).tolist()
    return [{"input_ids": row, "attention_mask": [1] * 8, "labels": row} for row in ids]


def planned_model():
    """The tied model both sides start from: the plan applied, LoRA weights random (B not zero)."""
    model = apply_plan(tiny_llama(LAYERS), PLAN, CFG)
    randomize_lora(model)
    return model.train()


WORKER = textwrap.dedent("""
    import dataclasses, json, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor
    sys.path.insert(0, sys.argv[2])
    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(sys.argv[1])
    from conftest import tiny_llama
    from test_fsdp import CFG, LR, PLAN, PROBE, batch, planned_model, probe_data
    from loradrop import apply_plan, evaluate_importance, export_peft, gathered_lora, save_adapter, shard_model
    from loradrop.sites import add_lora

    def full_grads(model):
        return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).contiguous()
                for n, p in model.named_parameters() if p.requires_grad}

    def step(model, seed):
        torch.manual_seed(seed + rank)  # rank dropout masks: rank r draws what the reference draws for half r
        loss = model(**batch(slice(2 * rank, 2 * rank + 2))).loss
        loss.backward()
        return loss.item()

    # one step: fp32, non-reentrant gradient checkpointing, DropLoRA, shared LoRAs replicated
    model = planned_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shard_model(model)
    loss = step(model, 100)
    grads = full_grads(model)
    save_file(grads, str(out / f"grads{rank}.safetensors"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    optimizer.step()
    with gathered_lora(model):
        if rank == 0:
            save_adapter(model, out / "adapter")
            export_peft(model, out / "peft")
    resharded = all(isinstance(p, DTensor) for n, p in model.named_parameters() if "down_proj.lora_" in n)

    # mixed precision: bf16 parameters, fp32 gradient reduction
    bf16 = shard_model(planned_model(), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                       reduce_dtype=torch.float32))
    bf16_loss = step(bf16, 100)
    save_file(full_grads(bf16), str(out / f"bf16_grads{rank}.safetensors"))

    # gradient accumulation: no communication while FSDP's gradient sync is off, one reduction after
    accumulating = shard_model(planned_model())
    accumulating.set_requires_gradient_sync(False)
    step(accumulating, 100)
    shared = {n: p.grad.clone() for n, p in accumulating.named_parameters() if p.requires_grad and not isinstance(p, DTensor)}
    save_file(shared, str(out / f"nosync_grads{rank}.safetensors"))
    accumulating.set_requires_gradient_sync(True)
    step(accumulating, 200)
    save_file(full_grads(accumulating), str(out / f"accumulated_grads{rank}.safetensors"))
    try:
        shard_model(planned_model(), mesh=init_device_mesh("cpu", (1, 2)))
        hsdp = ""
    except ValueError as err:
        hsdp = str(err)

    # the probe on a sharded PEFT model
    probe_model = shard_model(add_lora(tiny_llama(4), PROBE))
    result = evaluate_importance(probe_model, probe_data(), dataclasses.replace(PROBE, probe_batch_size=2))
    try:
        apply_plan(probe_model, result.plan, PROBE)
        refused = ""
    except ValueError as err:
        refused = str(err)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "loss": loss, "bf16_loss": bf16_loss, "resharded": resharded, "g": result.g,
        "plan": result.plan.to_json(), "refused": refused, "hsdp": hsdp}))
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """Runs the worker on 2 processes once; returns its output directory."""
    out = tmp_path_factory.mktemp("fsdp")
    script = out / "worker.py"
    script.write_text(WORKER)
    tests = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), str(out), tests], check=True, env=env, timeout=600)
    return out


def reference_step(model, seed: int = 100) -> float:
    """What the two ranks compute together, in one process: each half of the batch with its rank's
    random stream, the mean of the two losses (FSDP averages gradients over ranks)."""
    losses = []
    for rank in range(2):
        torch.manual_seed(seed + rank)
        losses.append(model(**batch(slice(2 * rank, 2 * rank + 2))).loss)
    loss = (losses[0] + losses[1]) / 2
    loss.backward()
    return loss.item()


def untied_copy(tied):
    """Every site with its own LoRA, holding the tied model's weights: autograd gives each site its
    own gradient, which the shared LoRA's must equal the sum of."""
    model = add_lora(tiny_llama(LAYERS), CFG)
    add_rank_dropout(model, CFG.rank_dropout_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(tied.get_parameter(name))
    return model.train()


def site_name(module_type: str, layer: int, part: str) -> str:
    block = "mlp" if module_type == "down_proj" else "self_attn"
    return f"base_model.model.model.layers.{layer}.{block}.{module_type}.{part}.default.weight"


def test_one_step_equals_one_process(fsdp_run):
    tied = planned_model()
    untied = untied_copy(tied)
    loss = reference_step(tied)
    assert reference_step(untied) == pytest.approx(loss, rel=1e-6)
    ranks = [json.loads((fsdp_run / f"rank{r}.json").read_text()) for r in range(2)]
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(loss, rel=1e-5)

    grads = [load_file(fsdp_run / f"grads{r}.safetensors") for r in range(2)]
    expected = {n: p.grad for n, p in tied.named_parameters() if p.requires_grad}
    assert grads[0].keys() == expected.keys()
    for name, grad in expected.items():
        assert torch.allclose(grads[0][name], grad, rtol=1e-4, atol=1e-6), name
        assert torch.equal(grads[0][name], grads[1][name]), name  # the same gradient on every rank
    untied_grads = {n: p.grad for n, p in untied.named_parameters() if p.requires_grad}
    for module_type, layers in SHARED.items():
        for part in ("lora_A", "lora_B"):
            summed = sum(untied_grads[site_name(module_type, layer, part)] for layer in layers)
            shared = grads[0][site_name(module_type, layers[0], part)]
            assert torch.allclose(shared, summed, rtol=1e-4, atol=1e-6), (module_type, part)
            assert summed.abs().sum() > 0
    assert ranks[0]["resharded"]  # gathered_lora put the sharded parameters back


def test_adapter_saved_from_fsdp_stores_the_shared_lora_once_and_loads_tied(fsdp_run):
    tied = planned_model()
    reference_step(tied)
    torch.optim.SGD([p for p in tied.parameters() if p.requires_grad], lr=LR).step()
    weights = load_file(fsdp_run / "adapter" / "adapter_model.safetensors")
    assert "loradrop.shared.q_proj.lora_A.weight" in weights
    assert not any(f"layers.{layer}.self_attn.q_proj" in k for k in weights for layer in SHARED["q_proj"])

    loaded = load_adapter(tiny_llama(LAYERS), fsdp_run / "adapter")
    layers = lora_layers(loaded)
    for module_type, shared_layers in SHARED.items():
        names = [site_name(module_type, layer, "lora_A").removesuffix(".lora_A.default.weight") for layer in shared_layers]
        storages = {layers[n].lora_A["default"].weight.data_ptr() for n in names}
        assert len(storages) == 1, module_type  # one tensor for all sharing sites, as trained
    for name, param in tied.named_parameters():
        if param.requires_grad:
            assert torch.allclose(loaded.get_parameter(name), param, rtol=1e-5, atol=1e-6), name

    exported = PeftModel.from_pretrained(tiny_llama(LAYERS), fsdp_run / "peft").eval()
    tied.eval()
    with torch.no_grad():
        assert torch.allclose(exported(**batch()).logits, tied(**batch()).logits, atol=1e-5)


def test_mixed_precision_reduces_the_shared_lora_in_float32(fsdp_run):
    tied = planned_model()
    loss = reference_step(tied)
    ranks = [json.loads((fsdp_run / f"rank{r}.json").read_text()) for r in range(2)]
    assert (ranks[0]["bf16_loss"] + ranks[1]["bf16_loss"]) / 2 == pytest.approx(loss, abs=3e-2)
    grads = [load_file(fsdp_run / f"bf16_grads{r}.safetensors") for r in range(2)]
    for module_type, layers in SHARED.items():
        name = site_name(module_type, layers[0], "lora_B")
        assert grads[0][name].dtype == torch.float32
        assert torch.equal(grads[0][name], grads[1][name])
        cosine = torch.nn.functional.cosine_similarity(grads[0][name].flatten(), tied.get_parameter(name).grad.flatten(), 0)
        assert cosine > 0.99, (name, cosine)


def test_gradient_accumulation_reduces_the_shared_lora_once(fsdp_run):
    """While FSDP's gradient sync is off the shared gradient stays each rank's own; the backward that
    syncs averages what both micro-batches accumulated."""
    tied = planned_model()
    reference_step(tied, 100)
    reference_step(tied, 200)
    nosync = [load_file(fsdp_run / f"nosync_grads{r}.safetensors") for r in range(2)]
    accumulated = [load_file(fsdp_run / f"accumulated_grads{r}.safetensors") for r in range(2)]
    shared = site_name("q_proj", SHARED["q_proj"][0], "lora_B")
    assert not torch.allclose(nosync[0][shared], nosync[1][shared])  # not reduced yet
    for name, param in tied.named_parameters():
        if param.requires_grad:
            assert torch.allclose(accumulated[0][name], param.grad, rtol=1e-4, atol=1e-6), name
            assert torch.equal(accumulated[0][name], accumulated[1][name]), name


def test_shard_model_refuses_a_2d_mesh(fsdp_run):
    ranks = [json.loads((fsdp_run / f"rank{r}.json").read_text()) for r in range(2)]
    assert "takes a 1-D mesh" in ranks[0]["hsdp"] and "HSDP" in ranks[0]["hsdp"]


def test_probe_under_fsdp_sums_over_ranks_and_agrees_on_the_plan(fsdp_run):
    ranks = [json.loads((fsdp_run / f"rank{r}.json").read_text()) for r in range(2)]
    single = evaluate_importance(tiny_llama(4), probe_data(), dataclasses.replace(PROBE, probe_batch_size=4))
    assert ranks[0]["plan"] == ranks[1]["plan"]
    plan = Plan.from_json(ranks[0]["plan"])
    assert (plan.layers, plan.retained) == (single.plan.layers, single.plan.retained)
    for module_type, per_layer in single.g.items():
        for layer, value in per_layer.items():
            for rank in ranks:
                assert rank["g"][module_type][str(layer)] == pytest.approx(value, rel=1e-4)
    assert "apply the plan to an unsharded model" in ranks[0]["refused"]


def test_shard_model_needs_a_process_group():
    with pytest.raises(ValueError, match="init_process_group"):
        shard_model(planned_model())


def test_gathered_lora_leaves_an_unsharded_model_alone():
    model = planned_model()
    before = {n: p for n, p in model.named_parameters()}
    with gathered_lora(model) as inside:
        assert inside is model and all(p is before[n] for n, p in model.named_parameters())


# -- the runner: what it hands accelerate's FSDP2 plugin ----------------------------------------
def fsdp2_trainer(**plugin_args):
    """What ``_replicate_shared_loras`` reads of a Trainer under FSDP2 (accelerate's real plugin)."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, mixed_precision_policy=policy, **plugin_args)
    return SimpleNamespace(is_fsdp_enabled=True, accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)))


def test_runner_gives_accelerate_the_shared_loras_as_ignored_modules():
    from accelerate.utils.fsdp_utils import get_parameters_from_modules

    from loradrop.fsdp import replicated_params
    from loradrop.training import _replicate_shared_loras

    model, trainer = planned_model(), fsdp2_trainer()
    _replicate_shared_loras(trainer, model)
    plugin = trainer.accelerator.state.fsdp_plugin
    ignored = get_parameters_from_modules(plugin.ignored_modules, model, torch.device("cpu"))  # what fully_shard gets
    shared = {id(model.get_parameter(site_name(t, layers[0], part))) for t, layers in SHARED.items()
              for part in ("lora_A", "lora_B")}
    assert {id(p) for p in ignored} == shared == {id(p) for p in replicated_params(model)}
    assert (plugin.mixed_precision_policy.param_dtype, plugin.mixed_precision_policy.reduce_dtype) == (
        torch.bfloat16, torch.float32)


@pytest.mark.parametrize("plugin_args,message", [
    ({"ignored_modules": "lm_head"}, "remove fsdp_ignored_modules"),
    ({"cpu_ram_efficient_loading": True, "sync_module_states": True}, "set fsdp_cpu_ram_efficient_loading: false"),
    ({"activation_checkpointing": True}, "pass --gradient-checkpointing instead")])
def test_runner_refuses_fsdp2_settings_it_cannot_train_or_save(plugin_args, message):
    from loradrop.training import _replicate_shared_loras

    with pytest.raises(ValueError, match=message):
        _replicate_shared_loras(fsdp2_trainer(**plugin_args), planned_model())


def test_fsdp1_is_refused_for_a_shared_lora_naming_fsdp2(tmp_path, monkeypatch):
    from loradrop.config import RunConfig
    from loradrop.training import _check_fsdp

    shared = Plan(layers={"query": [0, 1, 2]}, retained={"query": [1]})
    fsdp1 = RunConfig(output_dir=str(tmp_path), extra={"fsdp": "full_shard", "fsdp_config": {"version": 1}})
    with pytest.raises(ValueError, match=r"FSDP version 1 cannot train a LoRA that several layers share; use FSDP2"):
        _check_fsdp(shared, fsdp1)
    _check_fsdp(Plan(layers=shared.layers, retained=shared.layers), fsdp1)  # plain LoRA is fine under FSDP1
    _check_fsdp(shared, RunConfig(output_dir=str(tmp_path), extra={"fsdp": "full_shard"}))  # transformers' default: 2
    _check_fsdp(shared, RunConfig(output_dir=str(tmp_path)))  # no FSDP, no objection
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch with an FSDP config
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="use FSDP2"):
        _check_fsdp(shared, RunConfig(output_dir=str(tmp_path)))
    monkeypatch.setenv("FSDP_VERSION", "2")
    _check_fsdp(shared, RunConfig(output_dir=str(tmp_path)))
