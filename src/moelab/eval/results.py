"""What the evaluation modules share: loading a run for scoring and merging into eval.json.

RUN_DIR/eval.json is a cache of results that several commands write (perplexity per split, the
built-in tasks under "tasks", lm-evaluation-harness under "lm_eval"). Each writer re-reads the
file and replaces only its own key, so results of the other commands survive.
"""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

from moelab.errors import CheckpointError, MoelabError

EVAL_FILE = "eval.json"


class MissingDependencyError(MoelabError, ImportError):
    """An optional package of the `eval` extra (lm-eval, matplotlib) is not installed."""

    def __init__(self, package: str, purpose: str):
        super().__init__(f"{purpose} needs the Python package {package!r}, which is not "
                         f"installed; install it with: pip install 'moelab[eval]'")


def load_run(run_dir: str | Path, device: str = "cpu"):
    """(model in eval mode, tokenizer, config, checkpoint dir, run dir) of a run's newest
    checkpoint (or of a checkpoint directory given directly)."""
    from moelab.data.tokenizer import load_tokenizer
    from moelab.loading import open_model
    from moelab.train.loop import resolve_device

    m = open_model(Path(run_dir).expanduser(), device=resolve_device(device))
    if m.kind == "mole-lut":
        raise CheckpointError(f"{run_dir} is a converted MoLE directory: this takes the "
                              "training run it was converted from")
    model, cfg, ckpt, tok_path = m.model, m.config, m.checkpoint, m.tokenizer
    if tok_path is None:
        raise CheckpointError(f"{run_dir}: no tokenizer.json in the run directory or next to "
                              f"{ckpt.name}; copy the data directory's tokenizer.json there")
    tok = load_tokenizer(tok_path)
    if tok.vocab_size > cfg.model.vocab_size:
        raise CheckpointError(f"{tok_path}: tokenizer has {tok.vocab_size} tokens but the model "
                              f"only {cfg.model.vocab_size}; it is not this run's tokenizer")
    return model, tok, cfg, ckpt, m.owner


def context_length(cfg) -> int:
    """Tokens the model sees at once when scoring: the training sequence length (positions
    beyond it were never trained), never more than the model's max_seq_len."""
    return int(min(cfg.train.seq_len, cfg.model.max_seq_len))


def checkpoint_step(ckpt: Path) -> int | None:
    tail = ckpt.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def read_eval_json(run_dir: str | Path) -> dict:
    """RUN_DIR/eval.json as a dict; {} when it is missing or damaged (it is only a cache of
    results, so a torn or hand-broken file is rebuilt rather than blocking evaluation)."""
    path = Path(run_dir) / EVAL_FILE
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def write_eval_json(run_dir: str | Path, data: dict) -> None:
    """Replace RUN_DIR/eval.json atomically (a reader never sees half a file). eval.json is a
    cache: when the directory cannot take it (read-only, full disk) the results, already
    computed and returned to the caller, are not thrown away for it; a warning says so."""
    import sys

    from moelab.fsutil import describe_os_error, write_json_atomic

    try:
        write_json_atomic(Path(run_dir) / EVAL_FILE, jsonable(data))
    except OSError as e:
        print(f"moelab: warning: results not saved to {Path(run_dir) / EVAL_FILE} "
              f"({describe_os_error(e)})", file=sys.stderr)


def merge_eval_json(run_dir: str | Path, key: str, entries: dict[str, Any]) -> dict:
    """eval.json[key].update(entries), written atomically; returns the whole file's dict."""
    data = read_eval_json(run_dir)
    section = data.get(key) if isinstance(data.get(key), dict) else {}
    section.update(jsonable(entries))
    data[key] = section
    write_eval_json(run_dir, data)
    return data


def jsonable(obj: Any) -> Any:
    """Plain JSON types only (numpy/torch scalars, tuples; non-finite floats become None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):  # numpy integers register here too
        return int(obj)
    try:
        x = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return x if math.isfinite(x) else None
