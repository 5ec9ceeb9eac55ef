"""The files of a run directory other than checkpoints and metrics, and the checks that tie a
run to its data and its config.

RUN_DIR/config.json is the whole config (train.steps = the run's total, data.dir = the absolute
data directory); RUN_DIR/run.json records the data directory and the parts of its meta.json
that identify it (shard SHA-256s, tokenizer hash, vocabulary), so `moelab eval RUN_DIR` finds the
data by default and `--resume` can refuse data that changed.
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path

import torch

from moelab.config import Config
from moelab.errors import CheckpointError, ConfigError, DataError
from moelab.fsutil import write_json_atomic

RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
# Train settings that decide which batch a step sees or the optimizer's parameter groups:
# resuming with other values would not continue the same run.
RESUME_FIXED_TRAIN = ("batch_size", "seq_len", "seed", "decay_norms_and_embeddings")


def data_identity(meta: dict) -> dict:
    """The parts of a data dir's meta.json that identify its contents."""
    tok = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}
    return {"vocab_size": meta["vocab_size"], "eos_id": meta["eos_id"], "dtype": meta["dtype"],
            "tokens": meta["tokens"], "documents": meta.get("documents", {}),
            "sha256": meta["sha256"], "files": meta["files"],
            "tokenizer_sha256": tok.get("sha256"), "source": meta.get("source")}


def check_vocab(meta: dict, cfg: Config, data_dir: Path) -> None:
    if meta["vocab_size"] > cfg.model.vocab_size:
        raise ConfigError(
            f"data dir {data_dir}: tokenizer has vocab_size {meta['vocab_size']} but "
            f"model.vocab_size is {cfg.model.vocab_size}; use --set "
            f"model.vocab_size={meta['vocab_size']}")


def read_run_info(run_dir: str | Path) -> dict:
    """run.json of a run, or {} for a run directory written without one."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def write_run_files(run_dir: Path, cfg: Config, data_dir: Path, meta: dict, device: str,
                    params: dict, resumed_from: str | None) -> None:
    """config.json, tokenizer.json (copied from the data dir) and run.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / CONFIG_FILE)
    tok = data_dir / TOKENIZER_FILE
    if tok.is_file():
        shutil.copyfile(tok, run_dir / TOKENIZER_FILE)
    info = read_run_info(run_dir) if resumed_from else {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    info.setdefault("created", now)
    info.update({
        "data_dir": str(data_dir.resolve()),
        "data": data_identity(meta),
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        **params,
    })
    if resumed_from:
        info.setdefault("resumes", []).append({"time": now, "from": resumed_from})
    write_json_atomic(run_dir / RUN_FILE, info)


def check_tokenizer_of_run(run_dir: Path, info: dict, meta: dict, data_dir: Path) -> None:
    """Refuse data tokenized with another tokenizer than the run was trained with (its scores
    and samples would be garbage), naming both sides: the tokenizer hash and vocabulary the
    run's run.json (`info`) recorded against the data dir's meta.json. The data dir's own
    tokenizer file is `moelab.data.shards.check_tokenizer`'s to check."""
    recorded = info.get("data") or {}
    was, was_vocab = recorded.get("tokenizer_sha256"), recorded.get("vocab_size")
    tok = meta.get("tokenizer") if isinstance(meta.get("tokenizer"), dict) else {}
    now = tok.get("sha256")
    if was and now and was != now:
        raise DataError(
            f"data dir {data_dir} was tokenized with another tokenizer (sha256 {now[:12]}..., "
            f"vocab {meta['vocab_size']}) than run {run_dir} was trained with (sha256 "
            f"{was[:12]}..., vocab {was_vocab}, data dir {info.get('data_dir', '?')})")
    if was_vocab is not None and was_vocab != meta["vocab_size"]:
        raise DataError(f"data dir {data_dir} has vocab_size {meta['vocab_size']} but run "
                        f"{run_dir} was trained on data with vocab_size {was_vocab}")


def check_same_data(run_dir: Path, meta: dict, data_dir: Path) -> None:
    """Refuse to resume on data whose tokenizer or train/val shards differ from the run's."""
    info = read_run_info(run_dir)
    check_tokenizer_of_run(run_dir, info, meta, data_dir)
    recorded = info.get("data")
    if not recorded:
        return  # no record: the loader's own check (shard hash of the train split) still runs
    for split in ("train", "val"):
        was, now = recorded["sha256"].get(split), meta["sha256"].get(split)
        if was != now:
            raise DataError(
                f"data dir {data_dir}: {split} shard differs from the one run {run_dir} was "
                f"trained on (sha256 {str(now)[:12]}... vs {str(was)[:12]}...); pass "
                f"--data {info.get('data_dir', 'the original data dir')}")


def check_resume_config(saved: Config, given: Config, ckpt: Path) -> None:
    """CheckpointError naming every field that makes `given` another run than `saved`."""
    from moelab.train.checkpoint import config_differences

    saved_model, given_model = saved.to_dict()["model"], given.to_dict()["model"]
    for d in (saved_model, given_model):
        d.pop("moe_backend")  # how experts are computed, not what they compute
    diffs = config_differences(saved_model, given_model, "model.")
    st, gt = saved.to_dict()["train"], given.to_dict()["train"]
    diffs += [f"train.{k}: checkpoint {st[k]!r}, given {gt[k]!r}"
              for k in RESUME_FIXED_TRAIN if st[k] != gt[k]]
    if saved.data.sampling != given.data.sampling:
        diffs.append(f"data.sampling: checkpoint {saved.data.sampling!r}, "
                     f"given {given.data.sampling!r}")
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise CheckpointError(
            f"{ckpt} belongs to a different run, cannot resume: {shown} (resume with the run's "
            f"own config: drop --preset/--config, or start a new --out)")
