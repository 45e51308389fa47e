"""Safety of the directories loradrop writes: run directories and adapter/export targets.

- ``exclusive_lock``: one writer per directory (``fcntl.flock`` on a lock file); a second process is
  told ``DIR is in use by pid N`` instead of interleaving its writes with the first one's.
- ``check_replaceable``: what may be replaced by a new adapter or export -- nothing, unless it is an
  adapter loradrop wrote (or ``force``), and never the current directory, one that holds it, or the
  source being exported.
- ``check_run_dir`` / ``run_config_differences``: a rerun resumes only the run its ``run_config.json``
  describes.
- ``newest_complete_checkpoint``: the checkpoint a resume starts from, with every file the Trainer
  writes present and readable; partial ones (a kill while the Trainer was saving) are set aside.

Standard library only: ``adapter_io`` and ``training`` both build on it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import time
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK_FILE = ".loradrop.lock"
RUN_CONFIG = "run_config.json"
# files of a run directory that only a run writes: with them and no run_config.json it is not ours to resume
RUN_ARTIFACTS = ("results.json", "best.json", "importance.json", "checkpoints", "adapter")
# settings that do not change what a run computes: a rerun may change them
NOT_COMPARED = ("output_dir", "show_progress", "gradient_checkpointing")  # these leave the numbers alone
NOT_COMPARED_EXTRA = ("disable_tqdm", "logging_steps", "report_to", "dataloader_num_workers", "save_total_limit",
                      "logging_dir", "run_name")
PARTIAL_DIR = "partial-checkpoints"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class DirectoryInUse(RuntimeError):
    """Another process holds the directory's lock."""


_held: set[str] = set()  # lock files this process holds: an inner exclusive_lock on one of them is a no-op


# -- one writer per directory ----------------------------------------------------------------------
def _holder(lock_file: Path) -> str:
    try:
        pid = lock_file.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


@contextmanager
def exclusive_lock(lock_file: str | os.PathLike, what: str | os.PathLike) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``lock_file`` (created, holding this pid) for the block, or
    raises ``DirectoryInUse("WHAT is in use by pid N")`` at once. The lock dies with the process, so a
    killed run never leaves a stale lock; the file is removed on release. Within one process a lock
    already held is not taken again (the inner block just runs). Without ``fcntl`` (Windows) no lock
    is taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_file = Path(lock_file)
    key = os.path.abspath(lock_file)
    if key in _held:
        yield
        return
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DirectoryInUse(f"{what} is in use by {_holder(lock_file)}: wait for it to finish "
                                     "or stop it") from None
            raise
        # the holder before us may have removed the file between our open and our lock: lock again
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _held.add(key)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        _held.discard(key)
        try:
            lock_file.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)


def target_lock(target: str | os.PathLike) -> Any:
    """The lock of an adapter or export target: ``.NAME.lock`` beside it (the target itself is
    replaced by a rename, so it cannot hold its own lock file)."""
    target = Path(target)
    return exclusive_lock(target.parent / f".{target.name}.lock", target)


# -- what may be replaced --------------------------------------------------------------------------
def _is_within(path: Path, other: Path) -> bool:
    """``path`` is ``other`` or one of its ancestors."""
    return path == other or path in other.parents


def check_replaceable(target: str | os.PathLike, force: bool, is_ours: Any, protect: Iterable[str | os.PathLike] = (),
                      how: str = "pass overwrite=True") -> None:
    """Raises ValueError unless writing a new adapter at ``target`` may replace what is there.

    Never allowed, even with ``force``: the current directory or a directory holding it, a path in
    ``protect`` (the source of an export) or one of its ancestors or descendants. Without ``force``
    only an adapter loradrop wrote (``is_ours(path)``) or an empty directory is replaced."""
    target = Path(target)
    resolved = target.resolve()
    if _is_within(resolved, Path.cwd().resolve()):
        raise ValueError(f"refusing to replace {target}: it is the current directory or holds it; pick a new directory")
    for source in protect:
        source = Path(source).resolve()
        if _is_within(resolved, source) or _is_within(source, resolved):
            raise ValueError(f"refusing to write {target}: it is, holds or is inside the source {source}; "
                             "pick another directory")
    if not os.path.lexists(target):
        if target.parent.exists() and not target.parent.is_dir():
            raise ValueError(f"cannot write {target}: {target.parent} is a file, not a directory")
        return
    if force:
        return
    if target.is_symlink() or not target.is_dir():
        kind = "a symbolic link" if target.is_symlink() else "a file"
        raise ValueError(f"{target} exists and is {kind}, not a loradrop adapter; {how} to replace it")
    if any(target.iterdir()) and not is_ours(target):
        raise ValueError(f"{target} exists and is not an adapter loradrop wrote; {how} to replace it")


# -- a rerun resumes only its own run --------------------------------------------------------------
def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The settings of a run that change its results; the nested LoRA-drop settings as ``lora.<field>``."""
    out = {k: v for k, v in config.items() if k not in NOT_COMPARED}
    if isinstance(out.get("extra"), dict):
        out["extra"] = {k: v for k, v in out["extra"].items() if k not in NOT_COMPARED_EXTRA}
    if isinstance(out.get("lora"), dict):
        out.update({f"lora.{k}": v for k, v in out.pop("lora").items()})
    return out


def run_config_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``name: stored there, current now`` for every setting that changes results and differs."""
    current = json.loads(json.dumps(current, default=str))  # as run_config.json holds it: tuples are lists
    before, now = comparable(stored), comparable(current)
    return [f"{k} {before.get(k, '(unset)')!r} there, {now.get(k, '(unset)')!r} now"
            for k in sorted(set(before) | set(now)) if before.get(k, "(unset)") != now.get(k, "(unset)")]


def check_out_dir(out: Path) -> None:
    """An ``--out`` that exists must be a directory (a run's or a probe's)."""
    if os.path.lexists(out) and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory: pick another --out")


def check_run_dir(out: str | os.PathLike, config: dict[str, Any]) -> bool:
    """Raises ValueError unless ``out`` can hold the run ``config`` describes: a new or non-run
    directory, or a run directory whose ``run_config.json`` has the same settings. Returns whether
    ``run_config.json`` is already there."""
    out = Path(out)
    check_out_dir(out)
    file = out / RUN_CONFIG
    if not file.is_file():
        found = [name for name in RUN_ARTIFACTS if (out / name).exists()]
        if found:
            raise ValueError(f"{out} holds run files ({', '.join(found)}) but no {RUN_CONFIG}: it is not a run "
                             "directory loradrop can resume; pick another --out")
        return False
    try:
        stored = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{file} is unreadable ({err}); pick another --out") from None
    if not isinstance(stored, dict):
        raise ValueError(f"{file} is not a run configuration; pick another --out")
    differences = run_config_differences(stored, config)
    if differences:
        raise ValueError(f"{out} holds another run ({'; '.join(differences)}): rerun with the same settings "
                         "to resume it, or pick another --out")
    return True


def remove_if_unused(out: Path, created_dir: bool, created_config: bool) -> None:
    """After a failed start: removes the ``run_config.json`` this run wrote when nothing a resume needs
    came after it, and the run directory when this run created it and left it empty."""
    if created_config and not any((out / name).exists() for name in RUN_ARTIFACTS):
        (out / RUN_CONFIG).unlink(missing_ok=True)
    if created_dir:
        try:
            out.rmdir()
        except OSError:
            pass  # not empty: keep what is there


# -- checkpoints -----------------------------------------------------------------------------------
def _zip_ok(file: Path) -> bool:
    """torch.save's zip: a file cut short lacks the central directory written at its end."""
    try:
        with zipfile.ZipFile(file) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _safetensors_ok(file: Path) -> bool:
    """The header parses and the file is as long as the header says."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return file.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def checkpoint_problem(folder: Path) -> str | None:
    """What is missing or broken in a Trainer checkpoint (as transformers 5's
    ``Trainer._save_checkpoint`` writes it, in this order: the weights, ``optimizer.pt``,
    ``scheduler.pt``, ``rng_state[_rank].pth``, then ``trainer_state.json``; FSDP's weight and
    optimizer files and folders are accepted too), or None when it is complete. Files written by
    ``torch.save`` are zip archives whose directory comes last, so a cut-short one does not open;
    safetensors files must be as long as their header says. Checkpoints saved with
    ``save_only_model`` (no optimizer) count as incomplete: the Trainer cannot resume from them."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
        step = int(_CHECKPOINT.match(folder.name).group(1))
        if state.get("global_step") != step:
            return f"trainer_state.json records step {state.get('global_step')}"
    except (OSError, ValueError, AttributeError):
        return "trainer_state.json is missing or unreadable"
    weights = [folder / n for n in ("adapter_model.safetensors", "model.safetensors") if (folder / n).is_file()]
    pickled = [folder / n for n in ("adapter_model.bin", "pytorch_model.bin", "pytorch_model_fsdp.bin")
               if (folder / n).is_file()]
    sharded = [p for p in folder.glob("pytorch_model_fsdp_*") if p.is_dir()]  # FSDP's sharded state dict
    if not (weights or pickled or sharded):
        return "the model weights are missing"
    if not (all(_safetensors_ok(w) for w in weights) and all(_zip_ok(w) for w in pickled)):
        return "the model weights are truncated"
    optimizer = [folder / n for n in ("optimizer.pt", "optimizer.bin") if (folder / n).is_file()]  # .bin: FSDP
    if not optimizer and not any(p.is_dir() for p in folder.glob("optimizer_*")):
        return "optimizer.pt is missing"
    if not all(_zip_ok(f) for f in optimizer):
        return f"{optimizer[0].name} is truncated"
    if not _zip_ok(folder / "scheduler.pt"):
        return "scheduler.pt is missing or truncated"
    rng = sorted(folder.glob("rng_state*.pth"))
    if not rng or not all(_zip_ok(f) for f in rng):
        return "the random-number state is missing or truncated"
    return None


def newest_complete_checkpoint(checkpoints: str | os.PathLike, set_aside: bool = True) -> str | None:
    """The highest-numbered complete checkpoint under ``checkpoints`` (None without one). Newer,
    incomplete ones -- a kill while the Trainer saved -- are renamed into ``../partial-checkpoints/``
    (out of the Trainer's reach: its rotation deletes whatever matches ``checkpoint-*``) when
    ``set_aside`` (the main process)."""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in checkpoints.iterdir()
                    if p.is_dir() and (m := _CHECKPOINT.match(p.name))), reverse=True)
    for _, folder in found:
        if checkpoint_problem(folder) is None:
            return str(folder)
        if set_aside:
            aside = checkpoints.parent / PARTIAL_DIR
            aside.mkdir(exist_ok=True)
            os.replace(folder, aside / f"{folder.name}.partial-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    return None
