"""Adapters on disk: loradrop's compact format and export to the standard PEFT format.

PEFT's ``save_pretrained`` writes a shared LoRA once per sharing site (safetensors cannot store
aliased tensors, so PEFT clones them), which throws away LoRA-drop's storage saving. The compact
format stores every distinct tensor once: retained sites under PEFT's own key names, each shared
LoRA once under ``loradrop.shared.<module type>.lora_{A,B}.weight``. ``adapter_config.json`` holds
PEFT's fields plus a ``loradrop`` section (format version, config, plan, shared groups, rank
dropout and the base model's fingerprint) so a load can check what it is given.

``export_peft`` writes the shared weights out per site: what ``PeftModel.from_pretrained`` and
serving stacks load, with no loradrop import.

Every write goes to a temporary directory beside the target and is renamed into place at the end,
so a failure half way leaves the previous adapter as it was. Weights are read with safetensors
only; nothing is unpickled.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import LoraDropConfig, RankDropoutConfig
from .rank_dropout import add_rank_dropout, rank_dropout_of
from .run_dir import check_replaceable, target_lock
from .selection import Plan
from .sharing import CONFIG_ATTR, PLAN_ATTR, restructure, shared_groups
from .sites import PEFT_PREFIX, find_sites, set_on_sites

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_SHARED_PREFIX = "loradrop.shared."
_FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "n_embd", "n_layer", "d_model", "num_layers")


# -- atomic writes: the one helper set of the package --------------------------------------------
def _new_file(directory: Path, name: str) -> tuple[int, Path]:
    """A new temporary file ``.NAME.<random>.tmp`` in ``directory``, created with mode 0o666 so the
    kernel applies the process's umask (as for any new file); the umask itself is never changed."""
    while True:
        tmp = directory / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` through a temporary file in the same directory and ``os.replace``
    (atomic on POSIX and Windows), creating parent directories. An existing file keeps its
    permissions; a new one gets the usual 0o666 minus umask, not ``mkstemp``'s private 0o600."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: {path.parent} is a file, not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else None
    fd, tmp = _new_file(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _json_default(obj: Any) -> Any:
    """Encodes what result dicts typically hold besides plain Python: numpy and torch numbers and
    arrays, paths, and dataclasses such as ``Plan``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors
        return obj.tolist()
    raise TypeError(f"write_json cannot encode an object of type {type(obj).__name__}: {obj!r:.80}")


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Writes ``obj`` as JSON (indent 2, sorted keys, so diffs between runs are readable) atomically.
    The text is built before the file is touched: an object that cannot be encoded raises and
    leaves any previous file as it was."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


# what an adapter or export directory written here holds: PEFT's save_pretrained adds a model card
_OURS = {CONFIG_FILE, WEIGHTS_FILE, "README.md"}
_MARKERS = ("loradrop_format", "loradrop_export")  # in the safetensors metadata of what loradrop wrote


def is_loradrop_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory loradrop wrote: a compact adapter or a PEFT export, holding
    ``adapter_config.json``, ``adapter_model.safetensors`` whose metadata carries loradrop's mark,
    and nothing else but PEFT's model card."""
    path = Path(path)
    try:
        names = {p.name for p in path.iterdir()}
        if not {CONFIG_FILE, WEIGHTS_FILE} <= names <= _OURS or not all((path / n).is_file() for n in names):
            return False
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
            metadata = f.metadata() or {}
    except (OSError, SafetensorError, ValueError):
        return False
    return any(m in metadata for m in _MARKERS)


def _stale(target: Path) -> Iterator[Path]:
    """Temporary and set-aside directories an earlier, killed write to ``target`` left beside it."""
    pattern = re.compile(r"^\." + re.escape(target.name) + r"\.(tmp|old)-[A-Za-z0-9_]{8}$")
    for entry in target.parent.iterdir():
        if pattern.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            yield entry


def _clean_stale(target: Path) -> None:
    """Removes what killed writes to ``target`` left beside it; where the kill fell between moving the
    previous adapter aside and moving the new one in, the previous adapter is put back first."""
    for entry in _stale(target):
        for previous in (entry / "previous", entry / "adapter"):  # "adapter": what loradrop 0.1.0 wrote
            if entry.name.startswith(f".{target.name}.old-") and previous.exists() and not os.path.lexists(target):
                os.replace(previous, target)
        shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False,
                     protect: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yields a temporary directory beside ``path`` that replaces ``path`` only when the block ends
    without an exception; otherwise it is removed and ``path`` is left as it was.

    Only one process writes ``path`` at a time (a lock file beside it; another writer gets
    ``DirectoryInUse``). What is at ``path`` is replaced only when loradrop wrote it (an adapter or
    export) or it is an empty directory, unless ``overwrite``; the current directory, a directory
    holding it and ``protect`` (and their ancestors) never are. Leftovers of killed writes to ``path``
    are cleaned up first."""
    target = Path(path)
    check_replaceable(target, overwrite, is_loradrop_output, protect)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(target):
        _clean_stale(target)
        check_replaceable(target, overwrite, is_loradrop_output, protect)  # again, now that we hold the lock
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            yield tmp
            if os.path.lexists(target):
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / "previous")
                try:
                    os.replace(tmp, target)
                except BaseException:
                    os.replace(old / "previous", target)  # put the previous adapter back
                    raise
                finally:
                    shutil.rmtree(old)
            else:
                os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


# -- what the model holds ------------------------------------------------------------------------
def _peft_model(model: nn.Module) -> PeftModel:
    if not isinstance(model, PeftModel):
        raise ValueError(f"expected a PEFT model (from loradrop.apply_plan or peft.get_peft_model), got {type(model).__name__}")
    return model


def _adapter(model: PeftModel) -> str:
    return model.active_adapter


def _base(model: PeftModel) -> nn.Module:
    return model.base_model.model


def fingerprint(base: nn.Module) -> dict[str, Any]:
    """What a load checks about the base model: its class and the config sizes that shape LoRA."""
    config = getattr(base, "config", None)
    values = config.to_dict() if config is not None else {}
    sizes = {k: values[k] for k in _FINGERPRINT_KEYS if k in values}
    if config is not None and hasattr(config, "num_labels"):
        sizes["num_labels"] = config.num_labels
    return {"architecture": type(base).__name__, **sizes}


def _site_key(site_name: str, part: str) -> str:
    """PEFT's key for a site's weight in a saved adapter (the adapter name is left out)."""
    return f"{site_name}.{part}.weight"


def _shared_key(module_type: str, part: str) -> str:
    return f"{_SHARED_PREFIX}{module_type}.{part}.weight"


def _compact_state(model: PeftModel) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """PEFT's adapter state with each shared LoRA once, and the sites of each shared group."""
    state = get_peft_model_state_dict(model, adapter_name=_adapter(model))
    groups = shared_groups(model, _adapter(model))
    for module_type, sites in groups.items():
        for part in ("lora_A", "lora_B"):
            state[_shared_key(module_type, part)] = state[_site_key(sites[0].name, part)]
            for site in sites:
                del state[_site_key(site.name, part)]
    state = {k: v.detach().contiguous() for k, v in state.items()}
    return state, {t: [s.name for s in sites] for t, sites in groups.items()}


def _loradrop_section(model: PeftModel, groups: dict[str, list[str]]) -> dict[str, Any]:
    cfg: LoraDropConfig | None = getattr(model, CONFIG_ATTR, None)
    plan: Plan | None = getattr(model, PLAN_ATTR, None)
    rank_dropout = rank_dropout_of(model)
    return {
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict() if cfg is not None else None,
        "plan": asdict(plan) if plan is not None else None,
        "shared": groups,
        "rank_dropout": asdict(rank_dropout) if rank_dropout is not None else None,
        "base_model": fingerprint(_base(model)),
    }


def _peft_fields(model: PeftModel) -> dict[str, Any]:
    fields = model.peft_config[_adapter(model)].to_dict()
    return json.loads(json.dumps(fields, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


# -- compact format ------------------------------------------------------------------------------
def save_adapter(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Writes the compact adapter: ``adapter_config.json`` and ``adapter_model.safetensors`` with
    every distinct tensor stored once. Atomic: the previous adapter at ``path`` survives a failure.
    An existing ``path`` is replaced only when loradrop wrote it (an adapter or an export) or it is an
    empty directory; ``overwrite=True`` replaces anything but the current directory and its ancestors."""
    model = _peft_model(model)
    state, groups = _compact_state(model)
    config = {**_peft_fields(model), "loradrop": _loradrop_section(model, groups)}
    with atomic_directory(path, overwrite) as tmp:
        _write_json(tmp / CONFIG_FILE, config)
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "loradrop_format": str(FORMAT_VERSION)})
    return Path(path)


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The adapter's config with a checked ``loradrop`` section; a clear error for anything else."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"{path} is not an adapter directory: {CONFIG_FILE} is missing")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); the adapter is damaged, save it again") from None
    section = config.get("loradrop") if isinstance(config, dict) else None
    if not isinstance(section, dict):
        raise ValueError(
            f"{path} has no loradrop section in {CONFIG_FILE}: it is not a loradrop adapter "
            "(a plain PEFT adapter loads with peft.PeftModel.from_pretrained)"
        )
    version = section.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has loradrop format version {version!r}, this loradrop reads up to {FORMAT_VERSION}: "
            "upgrade loradrop to load it"
        )
    for key in ("config", "rank_dropout", "base_model", "shared"):
        if section.get(key) is not None and not isinstance(section[key], dict):
            raise ValueError(f"{path}: loradrop.{key} in {CONFIG_FILE} is a {type(section[key]).__name__}, "
                             "not an object; the adapter is damaged, save it again")
    for module_type, sites in (section.get("shared") or {}).items():
        if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
            raise ValueError(f"{path}: loradrop.shared[{module_type!r}] in {CONFIG_FILE} is not a list of "
                             "site names; the adapter is damaged, save it again")
    if section.get("rank_dropout"):
        try:
            RankDropoutConfig(**section["rank_dropout"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: loradrop.rank_dropout in {CONFIG_FILE} is unreadable ({err}); "
                             "the adapter is damaged, save it again") from None
    return config


def _plan_of(section: dict[str, Any], path: str | os.PathLike) -> Plan | None:
    data = section.get("plan", "missing")
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the loradrop plan is {'missing' if data == 'missing' else 'unreadable'}; save the adapter again")
    try:
        return Plan(**data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: the loradrop plan is unreadable ({err}); save the adapter again") from None


def _read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise ValueError(f"{path}: {WEIGHTS_FILE} is missing")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file} is truncated or corrupt ({err}); save the adapter again") from None


def _check_base(expected: dict[str, Any], base: nn.Module) -> None:
    actual = fingerprint(base)
    for key, value in expected.items():
        if actual.get(key) != value:
            raise ValueError(
                f"the adapter was trained on a base model with {key}={value!r}, this base model has "
                f"{key}={actual.get(key)!r}; load it onto the base model it was trained on"
            )


def _expand(weights: dict[str, torch.Tensor], shared: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """The compact tensors under PEFT's per-site key names."""
    full = {k: v for k, v in weights.items() if not k.startswith(_SHARED_PREFIX)}
    for module_type, site_names in shared.items():
        for part in ("lora_A", "lora_B"):
            key = _shared_key(module_type, part)
            if key not in weights:
                raise ValueError(f"the adapter's weights lack the shared LoRA {key!r}; the file is incomplete")
            for name in site_names:
                full[_site_key(name, part)] = weights[key]
    return full


def _check_keys_and_shapes(model: PeftModel, weights: dict[str, torch.Tensor], full: dict[str, torch.Tensor],
                           shared: dict[str, list[str]]) -> None:
    expected = get_peft_model_state_dict(model, adapter_name=_adapter(model))
    known = set(expected) | {_shared_key(t, p) for t in shared for p in ("lora_A", "lora_B")}
    missing = sorted(set(expected) - set(full))
    extra = sorted(set(weights) - known)
    if missing or extra:
        raise ValueError(
            f"the adapter's weights do not match the model: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"extra keys {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for key, value in full.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{key} has shape {tuple(value.shape)} in the adapter but {tuple(expected[key].shape)} in the model; "
                "the adapter belongs to another base model or LoRA rank"
            )


def _lora_config(fields: dict[str, Any]) -> LoraConfig:
    known = LoraConfig.__dataclass_fields__
    return LoraConfig(**{k: v for k, v in fields.items() if k in known and k not in ("peft_type", "loradrop")})


def load_adapter(base_model: nn.Module, path: str | os.PathLike) -> PeftModel:
    """Builds the saved model on ``base_model``: PEFT's LoRA as saved, the plan's shared ties and
    dropped sites, the saved weights, and the rank mask and fast-path setting the model was saved
    with. Nothing of training's setup is replayed (no re-initialisation, no config-driven rank mask);
    its outputs equal the saved model's, and training can continue from it."""
    config = read_adapter_config(path)
    section = config["loradrop"]
    _check_base(section.get("base_model") or {}, base_model)
    plan = _plan_of(section, path)
    weights = _read_weights(path)
    cfg = LoraDropConfig.from_dict(section["config"]) if section.get("config") else None
    model = get_peft_model(base_model, _lora_config(config))
    adapter = _adapter(model)
    if plan is not None:
        restructure(model, plan, adapter)
    if cfg is not None:
        setattr(model, CONFIG_ATTR, cfg)
        set_on_sites(model, fast_path=cfg.fast_path)
    shared = section.get("shared") or {}
    full = _expand(weights, shared)
    _check_keys_and_shapes(model, weights, full, shared)
    set_peft_model_state_dict(model, full, adapter_name=adapter)
    if section.get("rank_dropout"):
        add_rank_dropout(model, RankDropoutConfig(**section["rank_dropout"]), adapter_name=adapter)
    return model


def load_base_model(path: str | os.PathLike, base_model: str | os.PathLike | None = None) -> nn.Module:
    """The base model an adapter was trained on: from ``base_model`` (a local folder or hub id) or the
    folder recorded in the adapter, as the recorded transformers class with the recorded head size."""
    import transformers

    config = read_adapter_config(path)
    expected = config["loradrop"].get("base_model") or {}
    source = base_model or config.get("base_model_name_or_path")
    if not source:
        raise ValueError(f"{path} does not record its base model: pass the base model's folder or hub id")
    cls = getattr(transformers, expected.get("architecture", ""), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"the adapter's base model class {expected.get('architecture')!r} is not a transformers model class")
    kwargs = {"num_labels": expected["num_labels"]} if "num_labels" in expected else {}
    return cls.from_pretrained(source, **kwargs)


# -- standard PEFT format ------------------------------------------------------------------------
def _site_regex(model: PeftModel) -> str:
    names = [re.escape(s.name.removeprefix(PEFT_PREFIX)) for s in find_sites(model)]
    return "^(?:" + "|".join(names) + ")$"


def export_peft(model: nn.Module, path: str | os.PathLike, overwrite: bool = False,
                protect: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Writes a plain PEFT adapter directory (shared weights written out per site) that
    ``peft.PeftModel.from_pretrained`` and serving stacks load. Where a plan dropped sites, the
    exported ``target_modules`` names exactly the sites that have LoRA. An existing ``path`` is
    replaced as ``save_adapter`` says (``overwrite``); ``protect`` (e.g. the source adapter) and its
    ancestors are never written. The weights' metadata marks the export as loradrop's
    (``loradrop_export``), which is how a later export knows it may replace it."""
    model = _peft_model(model)
    adapter = _adapter(model)
    plan: Plan | None = getattr(model, PLAN_ATTR, None)
    original = model.peft_config[adapter]
    exported = copy.deepcopy(original)
    if plan is not None and plan.others == "dropped":
        exported.target_modules = _site_regex(model)
    with atomic_directory(path, overwrite, protect) as tmp:
        model.peft_config[adapter] = exported
        try:
            model.save_pretrained(str(tmp), selected_adapters=[adapter])
        finally:
            model.peft_config[adapter] = original
        written = tmp / adapter if adapter != "default" else tmp
        if written != tmp:
            for item in written.iterdir():
                os.replace(item, tmp / item.name)
            written.rmdir()
        _mark_export(tmp / WEIGHTS_FILE)
    return Path(path)


def _mark_export(file: Path) -> None:
    """Adds ``loradrop_export`` to the metadata of the weights PEFT wrote (tensors unchanged)."""
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(file), metadata={**metadata, "loradrop_export": str(FORMAT_VERSION)})


# -- inspection ----------------------------------------------------------------------------------
def describe_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """What ``loradrop inspect`` prints: per module type the retained, shared and dropped layers,
    trainable parameters (each stored tensor once), bytes on disk and the plan."""
    config = read_adapter_config(path)
    section = config["loradrop"]
    plan = _plan_of(section, path)
    file = Path(path) / WEIGHTS_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file} is missing, truncated or corrupt ({err})") from None
    sites: dict[str, dict[str, list[int]]] = {}
    if plan is not None:
        for module_type, layers in plan.layers.items():
            roles = {"retained": [], "shared": [], "dropped": []}
            for layer in layers:
                roles[plan.role(module_type, layer)].append(layer)
            sites[module_type] = roles
    return {
        "path": str(path),
        "format_version": section["format_version"],
        "base_model": section.get("base_model"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        "sites": sites,
        "trainable_parameters": params,
        "bytes_on_disk": sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file()),
        "rank_dropout": section.get("rank_dropout"),
        "plan": section.get("plan"),
    }

