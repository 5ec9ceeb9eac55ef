"""Zero-shot scoring by log-likelihood: the core shared by the built-in tasks and lm-eval.

Tokenisation of a (context, continuation) pair: the context and context + continuation are both
encoded; where the context's tokens are a prefix of the joint encoding (the usual case: the
byte-level pre-tokenizer starts a new piece at a space) the continuation's tokens are the rest.
Where a BPE merge crosses the boundary, the split is made at the longest common prefix of the two
encodings, so the joint text is always scored exactly as the tokenizer encodes it and the scored
part covers the whole continuation (plus the few context characters of the merged token). Every
sequence starts with EOS, which the model saw before every document in training, so it acts as
BOS and an empty context is just [EOS].

Sequences longer than the context length (`max_length` tokens of model input) lose context tokens
from the left; a continuation longer than that cannot be scored and is an error.

Batching: requests that share one context (the choices of a multiple-choice item) encode the
context once with the KV cache and continue every choice from a copy of it (`expand_cache`), one
row per choice; requests with distinct contexts run as right-padded batched full forwards (a
causal model's predictions for real positions never see padding on their right). The model has
no attention mask, so contexts of different lengths cannot share a cached batch.

Metrics:
  acc       share of items whose highest total log-probability choice is the label
  acc_norm  the same after dividing each choice's log-probability by its length in characters
            (the choice text without the delimiter), lm-eval's acc_norm
  minimal pairs: acc = share of pairs whose good sentence has the strictly higher total
            log-probability (an exact tie counts as wrong; lm-eval's argmax would count it right)
Ties between choices go to the first, as numpy's argmax does in lm-eval.
"""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from moelab.errors import ConfigError
from moelab.layers.base import KVCache

TokPair = tuple[list[int], list[int]]  # (context ids starting with EOS, continuation ids)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def encode_pairs(tok, pairs: Sequence[tuple[str, str]]) -> list[TokPair]:
    """Token ids of (context, continuation) pairs, split as the module docstring says."""
    contexts = sorted({c for c, _ in pairs})
    ctx_ids = dict(zip(contexts, tok.encode_batch(contexts))) if contexts else {}
    joint = tok.encode_batch([c + x for c, x in pairs]) if pairs else []
    out = []
    for (c, _), whole in zip(pairs, joint):
        n = common_prefix_len(ctx_ids[c], whole)
        out.append(([tok.eos_id] + whole[:n], whole[n:]))
    return out


def truncate_pair(ctx: list[int], cont: list[int], max_length: int) -> TokPair:
    """Drop context tokens from the left until the model input (ctx + cont minus the last
    token) fits in `max_length`."""
    if len(cont) > max_length:
        raise ValueError(f"continuation of {len(cont)} tokens does not fit the model's context "
                         f"of {max_length} tokens")
    excess = len(ctx) + len(cont) - 1 - max_length
    return (ctx[excess:] if excess > 0 else ctx), cont


def expand_cache(cache: KVCache, n: int) -> KVCache:
    """A cache of n identical rows viewing a one-row cache (no copy: layers append with
    torch.cat, which writes new tensors and leaves the original rows untouched)."""
    out = KVCache(len(cache.layers))
    out.seq_len = cache.seq_len
    for src, dst in zip(cache.layers, out.layers):
        dst.tensors = {k: t.expand(n, *t.shape[1:]) for k, t in src.tensors.items()}
    return out


def _gather(logits_BTV: torch.Tensor, y_BT: torch.Tensor) -> tuple[list[float], list[bool]]:
    """Per row: sum of log p(y) over positions with y >= 0, and whether every such y was the
    argmax. Softmax only over the scored positions, not the whole (B, T, V) block."""
    mask_BT = y_BT >= 0
    sel_NV = logits_BTV[mask_BT].float()
    y_N = y_BT[mask_BT]
    lp_N = sel_NV.gather(1, y_N[:, None])[:, 0] - sel_NV.logsumexp(-1)
    miss_N = (sel_NV.argmax(-1) != y_N).double()
    row_N = mask_BT.nonzero()[:, 0]
    B = y_BT.shape[0]
    lp_B = torch.zeros(B, dtype=torch.float64, device=y_BT.device).index_add_(0, row_N,
                                                                              lp_N.double())
    miss_B = torch.zeros(B, dtype=torch.float64, device=y_BT.device).index_add_(0, row_N, miss_N)
    return lp_B.tolist(), (miss_B == 0).tolist()


def _pad(rows: list[list[int]], value: int, device) -> torch.Tensor:
    T = max(len(r) for r in rows)
    out_BT = torch.full((len(rows), T), value, dtype=torch.long)
    for b, r in enumerate(rows):
        out_BT[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out_BT.to(device)


def _score_full(model, reqs: list[TokPair], idx: list[int], batch_size: int, pad_id: int,
                device, results: list) -> None:
    order = sorted(idx, key=lambda i: -(len(reqs[i][0]) + len(reqs[i][1])))  # little padding
    for lo in range(0, len(order), batch_size):
        chunk = order[lo:lo + batch_size]
        inputs, targets = [], []
        for i in chunk:
            ctx, cont = reqs[i]
            full = ctx + cont
            inputs.append(full[:-1])
            targets.append([-100] * (len(ctx) - 1) + cont)  # target at t is full[t + 1]
        logits_BTV = model(_pad(inputs, pad_id, device)).logits
        for i, lp, greedy in zip(chunk, *_gather(logits_BTV, _pad(targets, -100, device))):
            results[i] = (lp, greedy)


def _score_shared_context(model, ctx: list[int], conts: list[list[int]], batch_size: int,
                          pad_id: int, device) -> list[tuple[float, bool]]:
    cache = model.new_cache()
    last_V = model(torch.tensor([ctx], device=device), cache=cache).logits[0, -1].float()
    first_lp_V, first_argmax = last_V.log_softmax(-1), int(last_V.argmax())
    out = []
    for lo in range(0, len(conts), batch_size):
        chunk = conts[lo:lo + batch_size]
        lps = [float(first_lp_V[c[0]]) for c in chunk]
        greedy = [c[0] == first_argmax for c in chunk]
        if max(len(c) for c in chunk) > 1:
            x_BT = _pad([c[:-1] or [pad_id] for c in chunk], pad_id, device)
            y_BT = _pad([c[1:] or [-100] for c in chunk], -100, device)
            logits_BTV = model(x_BT, cache=expand_cache(cache, len(chunk))).logits
            rest_lp, rest_greedy = _gather(logits_BTV, y_BT)
            lps = [a + b for a, b in zip(lps, rest_lp)]
            greedy = [a and b for a, b in zip(greedy, rest_greedy)]
        out += list(zip(lps, greedy))
    return out


def _shares_pay(ctx_len: int, cont_lens: list[int], use_cache) -> bool:
    if use_cache is True or use_cache is False:
        return use_cache and len(cont_lens) > 1
    # auto: encoding a context once instead of once per choice must outweigh one more
    # (small-batch) forward call per group
    return len(cont_lens) > 1 and ctx_len >= 2 * max(cont_lens) and ctx_len >= 8


@torch.inference_mode()
def score_token_pairs(model, reqs: Sequence[TokPair], batch_size: int = 16,
                      max_length: int | None = None, pad_id: int = 0,
                      use_cache: bool | str = "auto") -> list[tuple[float, bool]]:
    """(sum of continuation token log-probs, continuation is the greedy decode) per request."""
    device = next(model.parameters()).device
    L = max_length or model.config.max_seq_len
    reqs = [truncate_pair(list(c), list(x), L) for c, x in reqs]
    results: list = [None] * len(reqs)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (ctx, cont) in enumerate(reqs):
        if not ctx:
            raise ValueError("a scoring request needs at least one context token (EOS)")
        if not cont:
            results[i] = (0.0, True)  # an empty continuation has probability 1
        else:
            groups[tuple(ctx)].append(i)
    was_training = model.training
    model.eval()
    try:
        full: list[int] = []
        for ctx, members in groups.items():
            if _shares_pay(len(ctx), [len(reqs[i][1]) for i in members], use_cache):
                scored = _score_shared_context(model, list(ctx), [reqs[i][1] for i in members],
                                               batch_size, pad_id, device)
                for i, r in zip(members, scored):
                    results[i] = r
            else:
                full += members
        _score_full(model, reqs, full, batch_size, pad_id, device, results)
    finally:
        model.train(was_training)
    return results


def score_loglikelihood(model, tok, pairs: Sequence[tuple[str, str]], batch_size: int = 16,
                        max_length: int | None = None,
                        use_cache: bool | str = "auto") -> list[tuple[float, bool]]:
    """(log p(continuation | context), is_greedy) for each (context, continuation) text pair."""
    return score_token_pairs(model, encode_pairs(tok, pairs), batch_size, max_length,
                             tok.eos_id, use_cache)


def rolling_windows(tokens: Sequence[int], eos_id: int, max_length: int) -> list[TokPair]:
    """Disjoint chunks of at most `max_length` predicted tokens covering `tokens` (EOS before
    the first); each chunk's input is the `max_length` tokens right before its last prediction,
    so a short final chunk still gets a full context (lm-eval's rolling convention)."""
    seq = [eos_id, *tokens]
    out = []
    for a in range(0, len(tokens), max_length):
        b = min(a + max_length, len(tokens))
        s = max(0, b - max_length)
        out.append((seq[s:a + 1], seq[a + 1:b + 1]))
    return out


def score_rolling(model, tok, texts: Sequence[str], batch_size: int = 16,
                  max_length: int | None = None) -> list[float]:
    """Total log-probability of each text on its own (perplexity-style, no truncation)."""
    L = max_length or model.config.max_seq_len
    reqs, owner = [], []
    for t, ids in enumerate(tok.encode_batch(list(texts)) if texts else []):
        windows = rolling_windows(ids, tok.eos_id, L)
        reqs += windows
        owner += [t] * len(windows)
    scored = score_token_pairs(model, reqs, batch_size, L, tok.eos_id, use_cache=False)
    totals = [0.0] * len(texts)
    for t, (lp, _) in zip(owner, scored):
        totals[t] += lp
    return totals


# ---------------------------------------------------------------------------------------------
# task metrics
# ---------------------------------------------------------------------------------------------
def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda j: (values[j], -j))  # first of equal maxima


def score_multiple_choice(model, tok, items: Sequence[dict], delimiter: str = " ",
                          **kw) -> dict:
    """acc and acc_norm of items {"context", "choices", "label"}; continuation = delimiter +
    choice. Per-item log-probs and predictions are under "items"."""
    pairs = [(it["context"], delimiter + ch) for it in items for ch in it["choices"]]
    scored = iter(score_loglikelihood(model, tok, pairs, **kw))
    per_item = []
    for it in items:
        lls = [next(scored)[0] for _ in it["choices"]]
        norm = [ll / max(len(ch), 1) for ll, ch in zip(lls, it["choices"])]
        per_item.append({"lls": lls, "pred": _argmax(lls), "pred_norm": _argmax(norm),
                         "label": int(it["label"])})
    n = len(per_item)
    return {"acc": sum(r["pred"] == r["label"] for r in per_item) / n if n else None,
            "acc_norm": sum(r["pred_norm"] == r["label"] for r in per_item) / n if n else None,
            "n": n, "items": per_item}


def score_minimal_pairs(model, tok, items: Sequence[dict], **kw) -> dict:
    """Share of pairs {"good", "bad"[, "phenomenon"]} where the good sentence is more likely."""
    pairs = [("", s) for it in items for s in (it["good"], it["bad"])]
    scored = score_loglikelihood(model, tok, pairs, **kw)
    per_item, by_phen = [], defaultdict(list)
    for k, it in enumerate(items):
        good, bad = scored[2 * k][0], scored[2 * k + 1][0]
        per_item.append({"lls": [good, bad], "correct": good > bad})
        by_phen[it.get("phenomenon", "all")].append(good > bad)
    n = len(per_item)
    return {"acc": sum(r["correct"] for r in per_item) / n if n else None, "n": n,
            "by_phenomenon": {p: {"acc": sum(v) / len(v), "n": len(v)}
                              for p, v in sorted(by_phen.items())},
            "items": per_item}


def score_task(name: str, model, tok, items: Sequence[dict], batch_size: int = 16,
               max_length: int | None = None) -> dict:
    from moelab.eval.tasks import TASKS

    spec = TASKS[name]
    if spec.kind == "minimal_pairs":
        return score_minimal_pairs(model, tok, items, batch_size=batch_size,
                                   max_length=max_length)
    return score_multiple_choice(model, tok, items, delimiter=spec.delimiter,
                                 batch_size=batch_size, max_length=max_length)


def run_tasks(run_dir: str | Path, tasks: Sequence[str], limit: int | None = None,
              batch_size: int = 16, device: str = "cpu") -> dict:
    """Score a run's newest checkpoint on built-in tasks; results are merged into
    RUN_DIR/eval.json under "tasks" and returned ({task: metrics})."""
    from moelab.eval.results import checkpoint_step, context_length, load_run, merge_eval_json
    from moelab.eval.tasks import build_task, check_task_names

    names = check_task_names(tasks)
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit {limit}: expected a positive number of items")
    model, tok, cfg, ckpt, owner = load_run(run_dir, device)
    out = {}
    for name in names:
        start = time.perf_counter()
        items = build_task(name)[:limit]
        res = score_task(name, model, tok, items, batch_size, context_length(cfg))
        res.pop("items")
        out[name] = {**res, "checkpoint": ckpt.name, "step": checkpoint_step(ckpt),
                     "limit": limit, "wall_s": round(time.perf_counter() - start, 3)}
    merge_eval_json(owner, "tasks", out)
    return out
