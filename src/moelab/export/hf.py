"""Export a moelab run to a Hugging Face transformers directory.

    export_hf("runs/moe-tiny", "hf/moe-tiny")            # CLI: moelab export hf RUN_DIR --out DIR

writes

    config.json              MoelabConfig: moelab's ModelConfig under `moelab_config`, the names
                             transformers/lm-eval read (vocab_size, hidden_size, ...), auto_map
    generation_config.json   bos/eos/pad token ids (all the end-of-text token)
    model.safetensors        the weights under `model.` (the MoELM inside MoelabForCausalLM), each
                             tensor once (a tied head or a shared expert bank is an alias)
    configuration_moelab.py  + modeling_moelab.py: the modeling code (moelab/export/hf_modeling)
    tokenizer.json           the run's tokenizer, with tokenizer_config.json and
                             special_tokens_map.json for AutoTokenizer (PreTrainedTokenizerFast)
    README.md                a model card

so that, offline,

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    AutoTokenizer.from_pretrained(DIR)

give moelab's logits and `generate()` runs with moelab's KV cache. The modeling code imports the
installed moelab package (one implementation of every architecture; see the model card).
"""
from __future__ import annotations

import json
import shutil
import time
from importlib import resources
from pathlib import Path
import torch

from moelab.errors import CheckpointError, ConfigError
from moelab.fsutil import atomic_directory

MODELING_FILES = ("configuration_moelab.py", "modeling_moelab.py")
WEIGHTS_PREFIX = "model."  # MoelabForCausalLM.model is the MoELM


def export_hf(run_dir: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None,
              overwrite: bool = False) -> Path:
    """Write the newest checkpoint of `run_dir` (or the checkpoint directory itself) as a
    transformers model directory `out_dir`; returns it. `tokenizer` overrides the run's
    tokenizer.json."""
    from moelab.data.tokenizer import load_tokenizer
    from moelab.loading import open_model

    out = _check_out(Path(out_dir).expanduser(), overwrite)  # before the (large) model loads
    opened = open_model(run_dir)  # any model directory; CheckpointError for a damaged one
    if opened.kind == "mole-lut":
        raise ConfigError(f"{run_dir} is a converted MoLE directory; export the training run "
                          "it was converted from (its mole_lut.json names the checkpoint)")
    model, cfg, ckpt = opened.model, opened.config, opened.checkpoint
    tok_path = Path(tokenizer) if tokenizer is not None else opened.tokenizer
    if tok_path is None:
        raise CheckpointError(f"{run_dir}: no tokenizer.json in the run or checkpoint "
                              "directory; pass the tokenizer the model was trained with")
    tok = load_tokenizer(tok_path)  # DataError for an invalid file
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer {tok_path} has {tok.vocab_size} tokens but the model's "
                          f"vocab_size is {cfg.model.vocab_size}")
    with atomic_directory(out) as tmp:  # a failed export leaves --out as it was
        _write_export(tmp, model, cfg, ckpt, tok, tok_path)
    return out


def is_exported_dir(path: Path) -> bool:
    """Whether `path` holds a model written by `export_hf` (its config names moelab)."""
    try:
        hf_config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(hf_config, dict) and hf_config.get("model_type") == "moelab"
            and (path / "modeling_moelab.py").is_file())


def _check_out(out: Path, overwrite: bool) -> Path:
    """--out may be new or empty; an earlier export is replaced only with --overwrite; any other
    directory (a training run, a data dir, a transformers model) never."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; expected a new or empty directory")
    if not out.exists() or not any(out.iterdir()):
        return out
    if not is_exported_dir(out):
        what = ("a moelab run directory" if (out / "run.json").is_file()
                or (out / "checkpoints").is_dir() else "not an exported moelab model")
        raise ConfigError(f"--out {out}: exists and is {what}; refusing to replace it (also "
                          "with --overwrite), choose a new or empty directory")
    if not overwrite:
        raise ConfigError(f"--out {out}: holds an earlier export; pass --overwrite to replace "
                          "it, or choose a new directory")
    return out


def _write_export(out: Path, model, cfg, ckpt: Path, tok, tok_path: Path) -> None:
    from safetensors.torch import save_file

    import moelab

    weights = {WEIGHTS_PREFIX + name: p.detach().to("cpu", torch.float32).contiguous()
               for name, p in model.named_parameters()}  # de-duplicated: aliases once
    weights.update({WEIGHTS_PREFIX + name: b.detach().cpu().contiguous()
                    for name, b in model.named_buffers()})
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})

    eos = tok.eos_id
    hf_config = {
        "architectures": ["MoelabForCausalLM"],
        "model_type": "moelab",
        "auto_map": {"AutoConfig": "configuration_moelab.MoelabConfig",
                     "AutoModelForCausalLM": "modeling_moelab.MoelabForCausalLM"},
        "moelab_config": cfg.to_dict()["model"],
        "vocab_size": cfg.model.vocab_size,
        "hidden_size": cfg.model.d_model,
        "num_hidden_layers": cfg.model.n_layers,
        "max_position_embeddings": cfg.model.max_seq_len,
        "tie_word_embeddings": cfg.model.tie_embeddings,
        "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos,
        "use_cache": True,
        "dtype": "float32",
        "moelab_version": moelab.__version__,
        "moelab_checkpoint": {"name": ckpt.name, "run": cfg.name},
    }
    _write_json(out / "config.json", hf_config)
    _write_json(out / "generation_config.json",
                {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos})
    for name in MODELING_FILES:
        text = resources.files("moelab.export.hf_modeling").joinpath(name).read_text()
        (out / name).write_text(text)
    _write_tokenizer(out, tok_path, tok.eos_token, cfg.model.max_seq_len)
    (out / "README.md").write_text(model_card(cfg, ckpt, model, tok.vocab_size))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_tokenizer(out: Path, tok_path: Path, eos_token: str, max_len: int) -> None:
    """tokenizer.json plus the two files AutoTokenizer reads. BOS = EOS = PAD = end-of-text:
    moelab starts scoring with end-of-text as the first context token (as lm-eval's hf model
    does with the BOS token), and `split_special_tokens` keeps moelab's behaviour of encoding a
    literal "<|endoftext|>" inside text as ordinary bytes."""
    if tok_path.resolve() != (out / "tokenizer.json").resolve():
        shutil.copyfile(tok_path, out / "tokenizer.json")
    special = {"bos_token": eos_token, "eos_token": eos_token, "pad_token": eos_token}
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **special,
        "model_max_length": max_len, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "split_special_tokens": True,
    })
    _write_json(out / "special_tokens_map.json", special)


def model_card(cfg, ckpt: Path, model, vocab: int) -> str:
    from moelab.flops import count, human

    c = count(cfg.model, seq_len=min(cfg.model.max_seq_len, 1024))
    m = cfg.model
    return f"""---
library_name: transformers
tags: [moelab, mixture-of-experts, custom_code]
---
# {cfg.name} (moelab)

A `{m.attention.kind}` attention / `{m.ffn.kind}` FFN decoder trained with moelab, exported
from checkpoint `{ckpt.name}` on {time.strftime("%Y-%m-%d")}.

| | |
|---|---|
| parameters | {human(c["params_total"])} total, {human(c["params_active"])} active per token |
| layers | {m.n_layers} ({m.n_distinct_layers} distinct), d_model {m.d_model} |
| context | {m.max_seq_len} tokens |
| vocabulary | {vocab} (byte-level BPE; end-of-text is BOS, EOS and padding) |

## Loading

The modeling code (`modeling_moelab.py`) runs moelab's own model class, so **moelab must be
installed** where the model is loaded (`pip install moelab`, version
{_moelab_version()} or compatible), in addition to `trust_remote_code=True`:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("DIR", trust_remote_code=True)
tok = AutoTokenizer.from_pretrained("DIR")
ids = tok("The king", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=20, do_sample=False)[0]))
```

lm-evaluation-harness: `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True
--tasks ...`.

## Limitations

* No attention mask: batches of prompts of different lengths (padding) are refused; generate
  one prompt at a time or prompts of equal token length.
* `inputs_embeds`, beam search over padded inputs, gradient checkpointing and static caches are
  not supported.
* The full moelab config is in `config.json` under `moelab_config`.
"""


def _moelab_version() -> str:
    import moelab

    return moelab.__version__


__all__ = ["export_hf", "model_card", "MODELING_FILES"]
