"""Import a local transformers model directory as a moelab run.

    import_hf("models/Qwen3-0.6B", "runs/qwen3")       # CLI: moelab import hf DIR --out RUN

reads DIR/config.json (moelab/imports/hf_config.py), the safetensors weights (one file or an
index of shards; moelab/imports/hf_weights.py) and DIR/tokenizer.json, and writes

    RUN/config.json                      the moelab Config (model from config.json)
    RUN/tokenizer.json                   DIR's tokenizer, when it has one
    RUN/run.json                         where the model came from (`imported`)
    RUN/checkpoints/step-00000000/       config.json + model.safetensors (moelab names)

which every command takes like a trained run: eval (with --data), report, generate, export hf,
compare members, `train --init-from`. Nothing is fetched from a hub: DIR must hold the files.
The run directory appears whole or not at all (written beside, then renamed).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from moelab.config import Config
from moelab.errors import CheckpointError, ConfigError, DataError
from moelab.fsutil import atomic_directory

DTYPES = {"keep": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise CheckpointError(f"{hf_dir}: no such model directory")
    if not path.is_file():
        raise CheckpointError(f"{hf_dir}: no config.json (expected a transformers model "
                              "directory written by save_pretrained)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


def hf_model_config(hf_dir: str | Path) -> tuple[str, object, Config]:
    """(architecture, family, moelab Config) of a transformers model directory."""
    hf_dir = Path(hf_dir).expanduser()
    from moelab.imports.hf_config import translate

    arch, fam, m = translate(read_hf_config(hf_dir), str(hf_dir / "config.json"))
    seq = min(m["max_seq_len"], 1024)
    try:
        cfg = Config.from_dict({"name": hf_dir.resolve().name, "model": m,
                                "train": {"seq_len": seq}})
    except ConfigError as e:  # a value moelab's config refuses (e.g. heads not dividing)
        raise ConfigError(f"{hf_dir / 'config.json'}: {e}") from None
    return arch, fam, cfg


def _meta_shapes(cfg: Config) -> dict[str, torch.Size]:
    """moelab's tensors (each once, by its first name, as checkpoints store them) and shapes,
    from a model built on the meta device (no memory)."""
    from moelab.model import MoELM

    with torch.device("meta"):
        model = MoELM(cfg.model)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    shapes.update({n: b.shape for n, b in model.named_buffers()})
    return shapes


def check_tokenizer(path: Path, vocab_size: int):
    """The tokenizer moelab will use; DataError when it cannot be one for this model."""
    from moelab.data.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    if tok.vocab_size > vocab_size:
        raise DataError(f"{path}: the tokenizer has {tok.vocab_size} tokens but config.json's "
                        f"vocab_size is {vocab_size}; the tokenizer is not this model's")
    return tok


def _prepare(hf_dir: Path):
    """Everything an import needs, checked: (arch, Config, Shards, plan, shapes)."""
    from moelab.imports.hf_weights import Shards, check_plan, tensor_plan, tied_aliases

    arch, fam, cfg = hf_model_config(hf_dir)
    tok_path = hf_dir / "tokenizer.json"
    if tok_path.is_file():
        check_tokenizer(tok_path, cfg.model.vocab_size)
    shards = Shards(hf_dir)
    want = _meta_shapes(cfg)
    plan = tensor_plan(fam, cfg.model, shards.keys())
    extra = sorted(set(plan) - set(want))
    if extra:  # a source for a tensor the model does not have (an importer bug)
        raise CheckpointError(f"{hf_dir}: the mapping names {extra[0]!r}, which the moelab model "
                              "does not have")
    check_plan(plan, want, shards, str(hf_dir), tied_aliases(cfg.model))
    return arch, cfg, shards, plan, want


def import_hf(hf_dir: str | Path, out: str | Path | None = None, dtype: str = "keep",
              overwrite: bool = False) -> Path:
    """Write the transformers model directory `hf_dir` as a moelab run directory `out`
    (default runs/NAME) and return its path. `dtype`: keep (the checkpoint's), float32,
    bfloat16 or float16 for the stored weights."""
    from moelab.imports.hf_weights import write_streaming
    from moelab.train.checkpoint import PREFIX, checkpoint_dir

    hf_dir = Path(hf_dir).expanduser()
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: allowed {', '.join(DTYPES)}")
    arch, cfg, shards, plan, want = _prepare(hf_dir)
    out = Path(out).expanduser() if out is not None else Path("runs") / cfg.name
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"--out {out}: exists and is not empty; choose a new directory "
                          "or pass --overwrite")
    tok_path = hf_dir / "tokenizer.json"
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(out) as tmp:
        ckpt = checkpoint_dir(tmp) / f"{PREFIX}{0:08d}"
        ckpt.mkdir(parents=True)
        nbytes = write_streaming(ckpt / "model.safetensors", plan, want, shards, DTYPES[dtype],
                                 metadata={"moelab_import": arch})
        text = json.dumps(cfg.to_dict(), indent=2)
        (ckpt / "config.json").write_text(text)
        (tmp / "config.json").write_text(text)
        if tok_path.is_file():
            shutil.copyfile(tok_path, tmp / "tokenizer.json")
        info = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "imported": {"format": "hf", "architecture": arch,
                             "source": str(hf_dir.resolve()),
                             "config_sha256": _sha256(hf_dir / "config.json"),
                             "tokenizer": tok_path.is_file(), "bytes": nbytes,
                             "dtype": dtype, "seconds": round(time.perf_counter() - t0, 3)}}
        (tmp / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def load_hf(hf_dir: str | Path, device: str | torch.device = "cpu"):
    """(MoELM, Config) of a transformers model directory, built in memory with the same checks
    and mapping as `import_hf` (nothing written); float32 weights, eval mode."""
    from moelab.model import MoELM

    hf_dir = Path(hf_dir).expanduser()
    _, cfg, shards, plan, want = _prepare(hf_dir)
    model = MoELM(cfg.model)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name, src in plan.items():
            params[name].copy_(src.build([shards.get(k) for k in src.keys]))
    return model.to(device).eval(), cfg


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


__all__ = ["import_hf", "load_hf", "hf_model_config"]
