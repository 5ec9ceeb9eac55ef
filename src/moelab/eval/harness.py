"""lm-evaluation-harness model `moelab`: any moelab run directory as an `lm_eval` LM.

In-process (what `moelab eval RUN --lm-eval TASKS` uses)::

    from moelab.eval.harness import run_lm_eval
    run_lm_eval("runs/x", ["moelab_cloze", "moelab_minpairs"])      # -> RUN/eval.json "lm_eval"

From the shell, with lm-eval's own flags::

    python -m moelab.eval.harness --model moelab --model_args path=runs/x --tasks moelab_cloze

lm-eval 0.4 finds model names only in its own registry (its built-in table plus classes that
were imported and decorated with `@register_model`); it has no plugin entry-point group, so the
plain `lm_eval` command cannot know `moelab`. `python -m moelab.eval.harness` imports this module
(which registers the model) and then runs lm-eval's CLI unchanged. When the requested tasks
include moelab_cloze / moelab_minpairs and no --include_path is given, their YAML + JSONL are
generated into a temporary directory and passed as --include_path.

Model args: path (run or checkpoint directory), device (cpu, cuda, auto), batch_size,
max_length (default: the run's train.seq_len), seed (sampling in generate_until).
"""
from __future__ import annotations

if __name__ == "__main__":  # `python -m`: run the importable module, so the class (and its
    import sys as _sys  # registration) exists once, not also as __main__.MoelabLM

    from moelab.eval.harness import main as _main

    _sys.exit(_main())

import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from moelab.errors import ConfigError
from moelab.eval.results import (MissingDependencyError, checkpoint_step, context_length,
                                 load_run, merge_eval_json)
from moelab.train.checkpoint import resolve_checkpoint

try:
    # lm_eval.models first: lm-eval fills its built-in model table only while its registry is
    # empty, so registering "moelab" before that would hide "hf" and the others
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    raise MissingDependencyError("lm_eval", "evaluation with lm-evaluation-harness") from None
from moelab.eval.tasks import LM_EVAL_PREFIX, TASKS, export_lm_eval_tasks
from moelab.eval.zeroshot import score_loglikelihood, score_rolling, truncate_pair
from moelab.model import sample_next

DEFAULT_MAX_GEN_TOKS = 256


def _as_batch_size(value) -> int:
    if value is None or str(value).startswith("auto"):
        return 16  # no automatic search: small models on CPU gain nothing from it
    return max(1, int(value))


@register_model("moelab")
class MoelabLM(LM):
    """A moelab checkpoint behind lm-eval's request API (`path=`), or an already loaded
    model and tokenizer (`model=`, `tokenizer=`) for in-process use."""

    def __init__(self, path: str | None = None, device: str = "cpu", batch_size=16,
                 max_length: int | None = None, seed: int = 0, model=None, tokenizer=None,
                 max_batch_size=None, **unused):
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's CLI passes --device cuda:0 unless told otherwise
            print(f"moelab: {device} is not available, evaluating on the CPU", file=sys.stderr)
            device = "cpu"
        if model is None:
            if path is None:
                raise ValueError("model_args: give path=RUN_DIR (a moelab run or checkpoint)")
            model, tokenizer, cfg, ckpt, _ = load_run(path, device)
            max_length = max_length or context_length(cfg)
            self.checkpoint = str(ckpt)
        else:
            self.checkpoint = None
        self.model, self.tok = model, tokenizer
        self._device = next(model.parameters()).device
        self._max_length = int(max_length or model.config.max_seq_len)
        self._batch_size = _as_batch_size(batch_size)
        self.seed = int(seed)
        self.ignored_args = sorted(unused)  # e.g. trust_remote_code from lm-eval's CLI

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.source)

    def get_model_info(self) -> dict:
        return {"moelab_checkpoint": self.checkpoint, "max_length": self._max_length}

    # ---- lm-eval request types -------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        out = score_loglikelihood(self.model, self.tok, pairs, self._batch_size,
                                  self._max_length)
        for pair, res in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", pair, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        out = score_rolling(self.model, self.tok, texts, self._batch_size, self._max_length)
        for text, res in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), res)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [(r.args[0], dict(r.args[1] or {})) for r in requests]
        out = generate_until(self.model, self.tok, args, self._batch_size, self._max_length,
                             self.seed)
        for (ctx, kw), text in zip(args, out):
            self.cache_hook.add_partial("generate_until", (ctx, kw), text)
        return out


# ---------------------------------------------------------------------------------------------
# generation with stop strings
# ---------------------------------------------------------------------------------------------
def _stops(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [s for s in value if s]


def _cut(text: str, stops: list[str]) -> str:
    hits = [text.find(s) for s in stops if s in text]
    return text[:min(hits)] if hits else text


@torch.inference_mode()
def _generate_batch(model, tok, ctx_BT: torch.Tensor, max_new: int, stops: list[str],
                    temperature: float, top_k, top_p, generator) -> list[str]:
    """Continue equal-length contexts token by token with the KV cache until every row has
    produced EOS or a stop string, or `max_new` tokens."""
    B = ctx_BT.shape[0]
    cache = model.new_cache()
    logits_BV = model(ctx_BT, cache=cache).logits[:, -1].float()
    new: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new):
        next_B = sample_next(logits_BV, temperature, top_k, top_p, generator)
        for b, t in enumerate(next_B.tolist()):
            if done[b]:
                continue
            if t == tok.eos_id:
                done[b] = True
                continue
            new[b].append(t)
            # decode the tail only: a stop string is short, but may span several tokens
            tail = tok.decode(new[b][-(8 + max(map(len, stops), default=0)):])
            done[b] = any(s in tail for s in stops)
        if all(done) or step == max_new - 1:
            break
        logits_BV = model(next_B[:, None], cache=cache).logits[:, -1].float()
    return [_cut(tok.decode(ids), stops) for ids in new]


def generate_until(model, tok, requests: Sequence[tuple[str, dict]], batch_size: int = 16,
                   max_length: int | None = None, seed: int = 0) -> list[str]:
    """lm-eval's generate_until: (context, gen_kwargs) -> continuation cut before the first
    stop string (`until`), at most `max_gen_toks` tokens; greedy unless do_sample.

    The model has no attention mask, so only contexts of the same token length (and the same
    generation settings) share a batch; the context is left-truncated so that context plus
    generation fits `max_length`.
    """
    was_training = model.training
    model.eval()
    L = max_length or model.config.max_seq_len
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    encoded = tok.encode_batch([c for c, _ in requests]) if requests else []
    groups: dict[tuple, list[int]] = defaultdict(list)
    prepared = []
    for i, ((_, kw), ids) in enumerate(zip(requests, encoded)):
        max_new = max(1, min(int(kw.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), L))
        ctx, _ = truncate_pair([tok.eos_id, *ids], [0] * max_new, L)
        sample = bool(kw.get("do_sample", False))
        temperature = float(kw.get("temperature", 1.0)) if sample else 0.0
        settings = (len(ctx), max_new, tuple(_stops(kw.get("until"))), temperature,
                    kw.get("top_k"), kw.get("top_p"))
        prepared.append(ctx)
        groups[settings].append(i)
    out: list[str] = [""] * len(requests)
    try:
        for (_, max_new, stops, temperature, top_k, top_p), members in groups.items():
            for lo in range(0, len(members), batch_size):
                chunk = members[lo:lo + batch_size]
                ctx_BT = torch.tensor([prepared[i] for i in chunk], device=device)
                texts = _generate_batch(model, tok, ctx_BT, max_new, list(stops), temperature,
                                        top_k, top_p, generator)
                for i, text in zip(chunk, texts):
                    out[i] = text
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
# running lm-eval
# ---------------------------------------------------------------------------------------------
def _local_tasks(names: Sequence[str]) -> list[str]:
    return [n[len(LM_EVAL_PREFIX):] for n in names
            if n.startswith(LM_EVAL_PREFIX) and n[len(LM_EVAL_PREFIX):] in TASKS]


def _metrics(task_res: dict) -> dict:
    """lm-eval's "acc,none" / "acc_stderr,none" keys as "acc" / "acc_stderr"."""
    out = {}
    for key, value in task_res.items():
        if key == "alias":
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else key] = value
    return out


def run_lm_eval(run_dir: str | Path, tasks: Sequence[str] | str, include_path: str | None = None,
                limit: int | None = None, batch_size: int = 16, device: str = "cpu") -> dict:
    """Run lm-evaluation-harness in-process on a run's newest checkpoint; results are merged
    into RUN_DIR/eval.json under "lm_eval" ({task: metrics}) and returned.

    moelab_cloze / moelab_minpairs (also accepted as cloze / minpairs) are exported (YAML +
    JSONL) to RUN_DIR/lm_eval_tasks first.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str):
        tasks = tasks.split(",")
    # the built-in tasks' bare names are accepted too (cloze -> moelab_cloze)
    names = [LM_EVAL_PREFIX + t if t in TASKS else t for t in (t.strip() for t in tasks) if t]
    if not names:
        raise ConfigError("no lm-eval task given; e.g. moelab_cloze,moelab_minpairs")
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit {limit}: expected a positive number of items")
    start = time.perf_counter()
    owner = resolve_checkpoint(Path(run_dir).expanduser()).parent.parent
    paths = [include_path] if include_path else []
    local = _local_tasks(names)
    if local:
        paths.insert(0, export_lm_eval_tasks(owner / "lm_eval_tasks", local))
    # lm-eval's ~10k built-in YAMLs take seconds to index: skip them when all tasks are ours
    manager = TaskManager(include_path=paths or None,
                          include_defaults=len(local) < len(names) or bool(include_path))
    unknown = [n for n in names if n not in manager.all_tasks and not Path(n).is_file()]
    if unknown:
        raise ConfigError(f"lm-eval task {unknown[0]!r} not found; built in here: "
                          f"{', '.join(LM_EVAL_PREFIX + t for t in TASKS)}; lm-eval's own "
                          "tasks are listed by `lm_eval ls tasks`; your YAML tasks need "
                          "--include-path DIR")
    lm = MoelabLM(path=str(run_dir), device=device, batch_size=batch_size)
    res = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                          log_samples=False)
    ckpt = Path(lm.checkpoint)
    out = {}
    for task, task_res in res["results"].items():
        out[task] = {**_metrics(task_res), "n": res.get("n-samples", {}).get(task, {}).get(
            "effective"), "checkpoint": ckpt.name, "step": checkpoint_step(ckpt),
            "limit": limit}
    wall = round(time.perf_counter() - start, 3)
    for entry in out.values():
        entry["wall_s"] = wall  # one evaluation run covers all tasks
    merge_eval_json(owner, "lm_eval", out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m moelab.eval.harness [lm_eval flags]` or `... export-tasks DIR`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export-tasks"]:
        print(export_lm_eval_tasks(argv[1] if len(argv) > 1 else "moelab_lm_eval_tasks"))
        return 0
    given = [a.split("=", 1)[1] if a.startswith("--tasks=") else argv[i + 1]
             for i, a in enumerate(argv)
             if a.startswith("--tasks=") or (a == "--tasks" and i + 1 < len(argv))]
    if given and not any(a.split("=")[0] == "--include_path" for a in argv):
        local = _local_tasks([t for g in given for t in g.split(",")])
        if local:
            import tempfile

            tmp = tempfile.mkdtemp(prefix="moelab_lm_eval_tasks_")
            argv += ["--include_path", export_lm_eval_tasks(tmp, local)]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


__all__ = ["MoelabLM", "run_lm_eval", "generate_until", "export_lm_eval_tasks", "main"]
