"""Checkpoints are directories, written atomically.

RUN_DIR/
  config.json                 the run's whole Config
  tokenizer.json              copied from the data directory (when there is one)
  checkpoints/step-00000400/  config.json, model.safetensors, trainer state (optimizer.pt, state.json)

A checkpoint is first written to a hidden temporary directory beside its final name and then
renamed, so a crash while writing leaves the previous checkpoints intact and no half-written one
that `--resume` could pick. Weights are safetensors; anything loaded with torch.load uses
`weights_only=True`, so loading never executes pickled code.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model as st_load_model
from safetensors.torch import save_model as st_save_model

from moelab.config import Config
from moelab.errors import CheckpointError, MoelabError

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
                     _fail_after: str | None = None) -> Path:
    """Write checkpoint `step` atomically; `extra` maps file names to JSON-able dicts (`.json`)
    or tensors/state dicts (`.pt`). Prunes to the newest `keep_last` checkpoints."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        st_save_model(_unwrap(model), str(tmp / "model.safetensors"))
        for name, obj in (extra or {}).items():
            if _fail_after == name:  # test hook: simulate a crash in the middle of a write
                raise RuntimeError(f"simulated crash while writing {name}")
            if name.endswith(".json"):
                (tmp / name).write_text(json.dumps(obj, indent=2))
            else:
                torch.save(obj, tmp / name)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


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


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    try:
        missing, unexpected = st_load_model(_unwrap(model), str(ckpt / "model.safetensors"),
                                            strict=False)
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


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
