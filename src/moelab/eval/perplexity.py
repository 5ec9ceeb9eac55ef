"""Perplexity of a trained run on a held-out split, document by document.

Each document is scored on its own: its token sequence is prefixed with EOS (the separator the
model saw before every document in training), so the first real token is predicted too, and the
trailing EOS is not scored (the count is the document's own tokens). The sequence is cut into
non-overlapping windows of the run's training seq_len; each window is one model input with no
context carried over from the previous window (the cheap, standard approximation; a sliding
window would give a slightly lower number).

Reported:
  perplexity      exp(total NLL / total predicted tokens) over the whole split (token-weighted)
  doc_perplexity  mean over documents of exp(document mean NLL) (every document weighs the same)
Results go to RUN_DIR/eval.json: one entry per split plus, at the top level, the keys of the
split evaluated last. A converted MoLE directory (moelab convert mole-lut) is scored the same way,
through its lookup model, and keeps its own eval.json.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from moelab.errors import DataError

def document_windows(docs: list[np.ndarray], eos_id: int, seq_len: int,
                     max_tokens: Optional[int] = None) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(doc index, inputs, targets) windows of at most seq_len tokens, EOS-prefixed per doc.

    With `max_tokens`, documents are taken in order until that many tokens are scored; the
    document that crosses the limit is cut short.
    """
    windows = []
    budget = math.inf if max_tokens is None else max_tokens
    for d, doc_N in enumerate(docs):
        if budget <= 0:
            break
        doc_N = doc_N[:int(min(len(doc_N), budget))]
        budget -= len(doc_N)
        seq = np.concatenate([np.array([eos_id], dtype=np.int64), doc_N.astype(np.int64)])
        for lo in range(0, len(doc_N), seq_len):
            hi = min(lo + seq_len, len(doc_N))
            windows.append((d, seq[lo:hi], seq[lo + 1:hi + 1]))
    return windows


@torch.inference_mode()
def score_documents(model: torch.nn.Module, docs: list[np.ndarray], eos_id: int, seq_len: int,
                    batch_size: int = 8, device: str | torch.device = "cpu",
                    max_tokens: Optional[int] = None) -> dict:
    """Per-document NLL sums and token counts, batched over windows of all documents.

    Windows are sorted by length so a batch pads little; padding sits at the end of a row, so a
    causal model's predictions for the real positions do not see it, and padded targets are
    ignored.
    """
    windows = document_windows(docs, eos_id, seq_len, max_tokens)
    n_docs = max((w[0] for w in windows), default=-1) + 1
    nll_D = torch.zeros(n_docs, dtype=torch.float64)
    count_D = torch.zeros(n_docs, dtype=torch.int64)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i][1]))
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(order), batch_size):
            chunk = [windows[i] for i in order[lo:lo + batch_size]]
            T = len(chunk[0][1])
            x_BT = torch.full((len(chunk), T), eos_id, dtype=torch.long)
            y_BT = torch.full((len(chunk), T), -100, dtype=torch.long)
            for b, (_, inp, tgt) in enumerate(chunk):
                x_BT[b, :len(inp)] = torch.from_numpy(inp)
                y_BT[b, :len(tgt)] = torch.from_numpy(tgt)
            logits_BTV = model(x_BT.to(device)).logits.float()
            nll_BT = F.cross_entropy(logits_BTV.flatten(0, 1), y_BT.to(device).flatten(),
                                     ignore_index=-100, reduction="none").view_as(y_BT)
            nll_B = nll_BT.double().sum(1).cpu()
            doc_B = torch.tensor([c[0] for c in chunk])
            nll_D.index_add_(0, doc_B, nll_B)
            count_D.index_add_(0, doc_B, torch.tensor([len(c[2]) for c in chunk]))
    finally:
        model.train(was_training)
    return {"nll_D": nll_D, "count_D": count_D, "windows": len(windows)}


def perplexities(nll_D: torch.Tensor, count_D: torch.Tensor) -> dict:
    keep = count_D > 0
    nll_D, count_D = nll_D[keep], count_D[keep]
    tokens = int(count_D.sum())
    if tokens == 0:
        raise DataError("no tokens to score: the split's documents are all empty")
    mean_nll = float(nll_D.sum() / tokens)
    return {"perplexity": math.exp(mean_nll), "nll": mean_nll,
            "doc_perplexity": float(torch.exp(nll_D / count_D).mean()),
            "tokens": tokens, "documents": int(keep.sum())}


def evaluate_run(run_dir: str | Path, split: str = "val", data_dir: str | Path | None = None,
                 device: str = "auto", max_tokens: Optional[int] = None, batch_size: int = 8,
                 seq_len: Optional[int] = None, storage: Optional[str] = None) -> dict:
    """Perplexity of the newest checkpoint of `run_dir` on `split` of its data (or `data_dir`).

    `run_dir` may also be a directory written by `moelab convert mole-lut`: its lookup model is
    scored (tables in `storage`, see moelab.export.mole_model), and the data directory is found
    from the run.json / config.json the conversion copied. Writes eval.json into the run (or
    converted) directory, merged with what is there, and returns this split's results.
    """
    from moelab.data.loader import iter_documents
    from moelab.data.shards import check_tokenizer, load_meta
    from moelab.train.loop import resolve_device
    from moelab.train.rundir import check_tokenizer_of_run, check_vocab, read_run_info

    start = time.perf_counter()
    run_dir = Path(run_dir).expanduser()
    dev = resolve_device(device)
    model, cfg, owner, ckpt_name, lookup = _load_scored_model(run_dir, dev, storage)
    info = read_run_info(owner)
    if data_dir is None:
        data_dir = info.get("data_dir") or cfg.data.dir
        if data_dir is None:
            raise DataError(f"{run_dir}: the run records no data directory; pass --data DIR")
    data_dir = Path(data_dir).expanduser()
    meta = load_meta(data_dir)
    check_vocab(meta, cfg, data_dir)
    check_tokenizer(data_dir, meta)  # the data dir's tokenizer file is its meta.json's
    check_tokenizer_of_run(owner, info, meta, data_dir)
    if split not in meta["tokens"]:
        raise DataError(f"data dir {data_dir}: no split {split!r}; expected one of "
                        f"{sorted(meta['tokens'])}")
    T = seq_len or cfg.train.seq_len
    if T > cfg.model.max_seq_len:
        raise DataError(f"seq_len {T} is above the model's max_seq_len {cfg.model.max_seq_len}")
    docs = list(iter_documents(data_dir, split))
    scored = score_documents(model, docs, meta["eos_id"], T, batch_size, dev, max_tokens)
    wall = time.perf_counter() - start
    tail = ckpt_name.rsplit("-", 1)[-1]
    res = {"split": split, **perplexities(scored["nll_D"], scored["count_D"]),
           "windows": scored["windows"], "seq_len": T, "checkpoint": ckpt_name,
           "step": int(tail) if tail.isdigit() else None, "data_dir": str(data_dir.resolve()),
           "max_tokens": max_tokens, "wall_s": round(wall, 3)}
    if lookup is not None:
        res["lookup"] = lookup
    _write_eval_json(owner, split, res)
    return res


def _load_scored_model(path: Path, device, storage: Optional[str]):
    """(model, config, directory that owns eval.json, checkpoint name, lookup-table facts or
    None) of a training run / checkpoint, or of a converted MoLE directory."""
    from moelab.loading import open_model

    m = open_model(path, device=device, storage=storage or "auto")  # any model directory
    if m.kind == "mole-lut":
        h = m.model.tables.header
        source = (h.get("source") or {}).get("checkpoint")
        lookup = {"dtype": h["dtype"], "storage": m.model.tables.storage,
                  "bytes_per_token": h["bytes_per_token"], "source": source}
        return m.model, m.config, m.owner, Path(source).name if source else m.owner.name, lookup
    # results go to the run directory, also when a checkpoint dir was given
    return m.model, m.config, m.owner, m.checkpoint.name, None


def _write_eval_json(run_dir: Path, split: str, res: dict) -> None:
    """eval.json[split] = res; the top-level keys repeat the split evaluated last."""
    from moelab.eval.results import read_eval_json, write_eval_json

    data = read_eval_json(run_dir)
    data[split] = res
    data.update({"split": split, "perplexity": res["perplexity"],
                 "doc_perplexity": res["doc_perplexity"], "tokens": res["tokens"]})
    write_eval_json(run_dir, data)
