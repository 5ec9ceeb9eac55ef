"""Checkpoints are directories, written atomically.

RUN_DIR/
  config.json                 the run's whole Config
  tokenizer.json              copied from the data directory (when there is one)
  run.json                    the data directory (absolute) and its meta, for eval and resume
  checkpoints/step-00000400/  config.json, model.safetensors, and the trainer state:
      optimizer.pt            AdamW state, LR-schedule counters, fp16 grad-scaler state
      rng.pt                  torch CPU (and CUDA) generator states, numpy and python `random`
      state.json              step, tokens seen, data position and loader settings, val losses

A checkpoint is first written to a hidden temporary directory beside its final name and then
renamed, so a crash while writing leaves the previous checkpoints intact and no half-written one
that `--resume` could pick. Weights are safetensors; anything loaded with torch.load uses
`weights_only=True`, so loading never executes pickled code (which is why numpy and python RNG
states are stored as plain integer tensors, not as the objects those libraries return).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_file as st_save_file
from safetensors.torch import save_model as st_save_model

from moelab.config import Config
from moelab.errors import CheckpointError, MoelabError
from moelab.fsutil import atomic_directory, pid_alive

PREFIX = "step-"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
            and (p / "model.safetensors").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def write_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, config: Config,
                     extra: dict[str, object] | None = None, keep_last: int | None = None,
                     _fail_after: str | None = None,
                     state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step` atomically; `extra` maps file names to JSON-able dicts (`.json`)
    or tensors/state dicts (`.pt`). Prunes to the newest `keep_last` checkpoints.

    `state_dict` (full weights by name, aliases removed) is written instead of the model's own
    tensors: FSDP gathers it on rank 0, whose model holds only shards."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    try:
        _write_checkpoint_files(final, model, config, extra, _fail_after, state_dict)
    except Exception as e:
        cause = write_failure(e, root)
        if cause is None:
            raise
        last = latest_checkpoint(run_dir)
        kept = (f"{last.name} is the newest intact checkpoint (--resume continues from it)"
                if last is not None else "no earlier checkpoint exists")
        raise CheckpointError(f"could not write checkpoint {final} ({cause}); nothing of it was "
                              f"kept, {kept}") from None
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def write_failure(e: BaseException, where: Path | None = None) -> str | None:
    """The cause, in a few words, when `e` is the file system refusing a write (a full disk, a
    read-only or vanished directory, a file-size limit), as each writer reports it: OSError
    from Python, SafetensorError from safetensors, RuntimeError from torch.save's zip writer.
    None for anything else (a bug is not dressed up as a disk problem)."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    text = str(e)
    if isinstance(e, SafetensorError) or (isinstance(e, RuntimeError) and (
            "inline_container" in text or "PytorchStreamWriter" in text)):
        for known in ("No space left on device", "Read-only file system", "File too large",
                      "Permission denied", "Disk quota exceeded"):
            if known.lower() in text.lower():
                return known.lower()
        # torch.save's zip writer hides the errno: compare the free space with what the
        # newest checkpoint took (the one that failed needs about as much)
        free = _free_bytes(where)
        last = latest_checkpoint(where.parent) if where is not None else None
        need = sum(f.stat().st_size for f in last.iterdir()) if last is not None else 1 << 20
        if free is not None and free < need:
            return f"no space left on device ({free:,} bytes free, a checkpoint needs ~{need:,})"
        return "write failed: " + text.splitlines()[0][:160]
    return None


def _free_bytes(path: Path | None) -> int | None:
    try:
        return shutil.disk_usage(path).free if path is not None else None
    except OSError:
        return None


def _write_checkpoint_files(final: Path, model, config: Config, extra, _fail_after,
                            state_dict) -> None:
    with atomic_directory(final) as tmp:
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        if state_dict is not None:
            st_save_file(state_dict, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            st_save_model(_unwrap(model), str(tmp / "model.safetensors"))
        for name, obj in (extra or {}).items():
            if _fail_after == name:  # test hook: simulate a crash in the middle of a write
                raise RuntimeError(f"simulated crash while writing {name}")
            if name.endswith(".json"):
                (tmp / name).write_text(json.dumps(obj, indent=2))
            else:
                torch.save(obj, tmp / name)


def alias_free_weights(model: torch.nn.Module, persistent_buffers, full_tensor) -> dict:
    """The weights a single-process checkpoint holds, for a model whose tensors are shards:
    every parameter once, by its first name (a tied head is stored as the embedding), then the
    persistent buffers named in `persistent_buffers`; `full_tensor(name, tensor)` gives the whole
    tensor to store (gathered by FSDP or expert parallelism). On the CPU, contiguous."""
    weights = {n: full_tensor(n, p) for n, p in model.named_parameters()}
    weights.update({n: full_tensor(n, b) for n, b in model.named_buffers()
                    if n in persistent_buffers})
    return {n: t.detach().cpu().contiguous() for n, t in weights.items()}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    if (path / "model.safetensors").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path}: no complete checkpoint found (expected "
                              f"{checkpoint_dir(path)}/{PREFIX}NNNNNNNN/model.safetensors)")
    return latest


def read_config(ckpt: Path) -> Config:
    try:
        return Config.from_dict(json.loads((ckpt / "config.json").read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: config.json is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt}/config.json: not valid JSON ({e})") from None
    except MoelabError as e:
        raise CheckpointError(f"{ckpt}/config.json: {e}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Build the model a checkpoint (or a run's newest checkpoint) describes and load its weights.

    Returns (model, config, checkpoint_dir).
    """
    from moelab.model import MoELM

    ckpt = resolve_checkpoint(path)
    cfg = read_config(ckpt)
    model = MoELM(cfg.model)
    load_weights(model, ckpt)
    return model.to(device), cfg, ckpt


def check_weights_file(ckpt: Path) -> None:
    """CheckpointError naming ckpt/model.safetensors when it is not a whole safetensors file
    (zero-length, cut short, garbage, a pickle under that name). Reads the header only."""
    path = ckpt / "model.safetensors"
    try:
        with safe_open(str(path), "pt"):
            pass
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except SafetensorError as e:
        raise _damaged(path, e) from None


def _damaged(path: Path, e: SafetensorError) -> CheckpointError:
    return CheckpointError(f"{path}: damaged, not a complete safetensors file "
                           f"({path.stat().st_size:,} bytes; {str(e).splitlines()[0]})")


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    try:
        missing, unexpected = st_load_model(_unwrap(model), str(path), strict=False)
    except SafetensorError as e:  # the header check of check_weights_file, while loading
        raise _damaged(path, e) from None
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{ckpt}: weights do not fit this model "
                              f"({str(e).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt}: checkpoint is of another architecture "
            f"(missing {sorted(missing)[:3]}..., unexpected {sorted(unexpected)[:3]}...)")


def find_tokenizer(path: str | Path) -> Path | None:
    """tokenizer.json next to a checkpoint or in its run directory."""
    p = Path(path)
    for cand in (p / "tokenizer.json", p.parent.parent / "tokenizer.json"):
        if cand.is_file():
            return cand
    return None


# ---------------------------------------------------------------------------------------------
# trainer state (resume)
# ---------------------------------------------------------------------------------------------
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"  # written last: a checkpoint with it has everything resume needs


def capture_rng() -> dict:
    """Every random generator training may draw from, as tensors and ints only."""
    np_state = np.random.get_state()  # ('MT19937', keys uint32[624], pos, has_gauss, gauss)
    py_version, py_keys, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python_keys": torch.tensor(py_keys, dtype=torch.int64),
        "python_rest": [int(py_version), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    pos, has_gauss, gauss = state["numpy_rest"]
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), float(gauss)))
    version, gauss_next = state["python_rest"]
    random.setstate((int(version), tuple(int(k) for k in state["python_keys"].tolist()),
                     gauss_next))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        # a run resumed on fewer GPUs restores the generators it has
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


def write_training_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module,
                              config: Config, optimizer: torch.optim.Optimizer, scheduler,
                              scaler, trainer_state: dict, keep_last: int | None = None,
                              _fail_after: str | None = None,
                              state_dict: dict[str, torch.Tensor] | None = None,
                              optimizer_state: dict | None = None) -> Path:
    """A checkpoint with everything `--resume` needs to continue the same loss curve.

    Under FSDP the caller passes the gathered full `state_dict` and `optimizer_state` (in
    `Optimizer.state_dict()`'s index-keyed format), so every checkpoint has one format whatever
    the world size it was written at. RNG states are the writing process's (rank 0's)."""
    extra = {
        OPTIMIZER_FILE: {"optimizer": optimizer_state if optimizer_state is not None
                         else optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict() if scaler is not None else {}},
        RNG_FILE: capture_rng(),
        STATE_FILE: trainer_state,
    }
    return write_checkpoint(run_dir, step, model, config, extra=extra, keep_last=keep_last,
                            _fail_after=_fail_after, state_dict=state_dict)


def read_training_state(ckpt: Path, device: str | torch.device = "cpu") -> dict:
    """{"optimizer", "scheduler", "scaler", "rng", "state"} of a checkpoint; CheckpointError
    when it lacks trainer state (e.g. a weights-only checkpoint) or a file is unreadable."""
    missing = [f for f in (OPTIMIZER_FILE, RNG_FILE, STATE_FILE) if not (ckpt / f).is_file()]
    if missing:
        raise CheckpointError(f"{ckpt}: cannot resume from it, {', '.join(missing)} missing "
                              "(a weights-only checkpoint)")
    try:
        opt = torch.load(ckpt / OPTIMIZER_FILE, map_location=device, weights_only=True)
        rng = torch.load(ckpt / RNG_FILE, map_location="cpu", weights_only=True)
        state = json.loads((ckpt / STATE_FILE).read_text())
    except Exception as e:  # unpickling / JSON / zip errors all mean a damaged file
        raise CheckpointError(f"{ckpt}: trainer state is unreadable "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return {**opt, "rng": rng, "state": state}


def resume_point(run_dir: str | Path, device: str | torch.device = "cpu",
                 warn=None) -> tuple[Path, dict] | None:
    """The newest checkpoint of a run that is whole (config, weights header, trainer state all
    readable) and its trainer state; a damaged newer one is skipped with a warning through
    `warn(message)`. None when the run has no checkpoint at all; CheckpointError naming each
    damaged one when none is whole."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    damaged = []
    for ckpt in reversed(ckpts):
        try:
            read_config(ckpt)
            check_weights_file(ckpt)
            saved = read_training_state(ckpt, device)
        except CheckpointError as e:
            damaged.append(str(e))
            continue
        if damaged and warn is not None:
            warn(f"{damaged[0]}" + (f" (and {len(damaged) - 1} more damaged)" if
                                    len(damaged) > 1 else "")
                 + f"; resuming from the newest intact checkpoint, {ckpt.name}")
        return ckpt, saved
    raise CheckpointError(f"{run_dir}: every checkpoint is damaged, cannot resume: "
                          + "; ".join(damaged))


def remove_stale_tmp(run_dir: str | Path) -> None:
    """Delete temporary checkpoint directories that killed processes left behind (those of a
    live process, named `.tmp-step-N-PID`, are still being written and stay)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return
    for p in root.glob(".tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)


def config_differences(saved: dict, given: dict, prefix: str = "") -> list[str]:
    """'key: saved X, given Y' for every leaf that differs between two nested config dicts."""
    diffs = []
    for key in sorted(set(saved) | set(given), key=str):
        a, b = saved.get(key), given.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, name + ".")
        elif a != b:
            diffs.append(f"{name}: checkpoint {a!r}, given {b!r}")
    return diffs


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP
