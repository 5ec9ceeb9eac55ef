"""One entry point that opens any model directory moelab can run: `open_model(path)`.

| kind         | what the directory holds                                      | results (eval.json, report/) go to |
|--------------|---------------------------------------------------------------|------------------------------------|
| `run`        | config.json + checkpoints/step-N/ (trained, or `moelab import hf`) | the run directory            |
| `checkpoint` | one checkpoints/step-N/ directory                             | its run directory                  |
| `mole-lut`   | converted MoLE lookup tables (`moelab convert mole-lut`)      | the directory                      |
| `hf-export`  | `moelab export hf` output (config.json with `moelab_config`)  | the directory                      |
| `hf`         | a plain transformers directory (Llama, Qwen3, Mixtral, ...)   | the directory                      |

A plain transformers directory is mapped in memory with the importer's checks
(moelab/imports/hf.py); `moelab import hf` writes it once as a run, which opens faster and keeps
results apart from the original files. eval, report, generate, export hf, convert and
`train --init-from` all open their model here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from moelab.config import Config
from moelab.errors import CheckpointError

KINDS = ("run", "checkpoint", "mole-lut", "hf-export", "hf")


@dataclass
class OpenedModel:
    model: torch.nn.Module  # eval mode
    config: Config
    kind: str
    checkpoint: Path  # the checkpoint directory (the directory itself for the other kinds)
    owner: Path  # where results about the model are written
    tokenizer: Optional[Path]  # tokenizer.json that belongs to the model, if any


def _json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return d if isinstance(d, dict) else {}


def model_dir_kind(path: str | Path) -> str:
    """Which of KINDS a directory is; CheckpointError naming what was expected otherwise."""
    from moelab.export.mole_lut import HEADER
    from moelab.train.checkpoint import latest_checkpoint

    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such run or model directory")
    if (p / HEADER).is_file():
        return "mole-lut"
    cfg = _json(p / "config.json") if (p / "config.json").is_file() else {}
    if "moelab_config" in cfg:
        return "hf-export"
    if (p / "model.safetensors").is_file() and "model" in cfg:
        return "checkpoint"
    if latest_checkpoint(p) is not None or (p / "checkpoints").is_dir():
        return "run"
    if "architectures" in cfg or "model_type" in cfg:
        return "hf"
    raise CheckpointError(f"{p}: not a model directory (expected a moelab run or checkpoint, a "
                          "converted MoLE directory, or a transformers directory with "
                          "config.json)")


def open_model(path: str | Path, device: str | torch.device = "cpu",
               storage: str = "auto") -> OpenedModel:
    """The model in `path` (any of KINDS), in eval mode on `device`. `storage` is where a
    converted MoLE's lookup tables live (moelab/export/mole_model.py)."""
    p = Path(path).expanduser()
    kind = model_dir_kind(p)
    if kind == "mole-lut":
        from moelab.export.mole_model import load_converted, lookup_config

        model = load_converted(p, storage=storage, device=device)
        cfg = lookup_config(Config.from_dict(_json(p / "config.json")))
        return OpenedModel(model, cfg, kind, p, p, _tokenizer(p))
    if kind in ("run", "checkpoint"):
        from moelab.train.checkpoint import find_tokenizer, load_model

        model, cfg, ckpt = load_model(p, device=device)
        return OpenedModel(model.eval(), cfg, kind, ckpt, ckpt.parent.parent,
                           find_tokenizer(ckpt))
    if kind == "hf-export":
        return OpenedModel(*_open_export(p, device), kind, p, p, _tokenizer(p))
    from moelab.imports.hf import load_hf

    model, cfg = load_hf(p, device=device)
    return OpenedModel(model, cfg, kind, p, p, _tokenizer(p))


def _open_export(p: Path, device):
    """A `moelab export hf` directory: moelab's config under `moelab_config`, the weights
    under `model.` (moelab/export/hf.py)."""
    from safetensors.torch import load_file

    from moelab.export.hf import WEIGHTS_PREFIX
    from moelab.model import MoELM

    try:
        cfg = _export_config(p)
    except Exception as e:  # a hand-edited or foreign config
        raise CheckpointError(f"{p}/config.json: moelab_config does not parse ({e})") from None
    if not (p / "model.safetensors").is_file():
        raise CheckpointError(f"{p}: model.safetensors is missing")
    weights = load_file(str(p / "model.safetensors"))
    state = {k[len(WEIGHTS_PREFIX):]: v for k, v in weights.items()
             if k.startswith(WEIGHTS_PREFIX)}
    model = MoELM(cfg.model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{p}/model.safetensors: weights do not fit the config "
                              f"({str(e).splitlines()[-1].strip()})") from None
    tied = {"head.weight"} if cfg.model.tie_embeddings else set()
    if set(missing) - tied or unexpected or len(state) != len(weights):
        raise CheckpointError(f"{p}/model.safetensors: does not match moelab_config (missing "
                              f"{sorted(set(missing) - tied)[:3]}, unexpected "
                              f"{sorted(unexpected)[:3]})")
    return model.to(device).eval(), cfg


def read_model_config(path: str | Path) -> Config:
    """The Config of the model in a directory, without loading its weights."""
    p = Path(path).expanduser()
    kind = model_dir_kind(p)
    if kind in ("run", "checkpoint"):
        from moelab.train.checkpoint import read_config, resolve_checkpoint

        return read_config(resolve_checkpoint(p))
    if kind == "hf":
        from moelab.imports.hf import hf_model_config

        return hf_model_config(p)[2]
    if kind == "hf-export":
        return _export_config(p)
    return Config.from_dict(_json(p / "config.json"))


def _export_config(p: Path) -> Config:
    m = _json(p / "config.json")["moelab_config"]
    return Config.from_dict({"name": p.resolve().name, "model": m,
                             "train": {"seq_len": min(int(m.get("max_seq_len", 1024)), 1024)}})


def _tokenizer(p: Path) -> Optional[Path]:
    return p / "tokenizer.json" if (p / "tokenizer.json").is_file() else None


def load_any(path: str | Path, device: str | torch.device = "cpu", storage: str = "auto"):
    """(model, config, directory) of any model directory (see `open_model`); the directory is
    the checkpoint of a run, else the directory itself."""
    m = open_model(path, device=device, storage=storage)
    return m.model, m.config, m.checkpoint
