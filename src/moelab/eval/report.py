"""`moelab report RUN_DIR`: figures and a summary of a run, as report.md + report.json + PNGs.

Sections (each skipped, with a sentence saying why, when it does not apply):
  training     train and validation loss vs optimizer step and vs tokens (metrics.jsonl)
  routing      expert load per router (heatmap) and dead experts, measured by running the final
               checkpoint on held-out text; beside it the load logged at the last validation step
               of training when metrics.jsonl has it; router entropy over training
  diagnostics  mean attention on the first token (the attention sink) and the largest
               |hidden state| after each layer, final checkpoint on held-out text
Held-out text: the run's data directory (`data_dir`, else the one run.json records), split "test"
(else "val"); when there is none, the bundled corpus's test documents encoded with the run's
tokenizer. `windows` windows of the run's train.seq_len tokens, spread evenly over the text.

Every number appears in report.json rounded to 4 significant digits and is printed in report.md
from that rounded value, so the two always agree.
"""
from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from moelab.errors import DataError
from moelab.eval.results import (MissingDependencyError, checkpoint_step, context_length,
                                 jsonable, load_run)

ROUTER_METRIC_RE = re.compile(r"^(layer\d+\.[^ ]+)\.(load|dead|entropy)$")


def _r(x):
    """Round to the 4 significant digits the report prints (ints stay ints)."""
    if x is None or isinstance(x, (bool, int, np.integer)):
        return x
    x = float(x)
    return float(f"{x:.4g}") if math.isfinite(x) else None


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    return str(x) if isinstance(x, int) else f"{x:.4g}"


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def _heldout_tokens(run_dir: Path, cfg, tok, data_dir) -> tuple[list[np.ndarray], str]:
    """Token arrays of held-out documents and a description of where they came from."""
    from moelab.data.loader import iter_documents
    from moelab.data.shards import load_meta
    from moelab.train.rundir import read_run_info

    candidates = [data_dir] if data_dir else [read_run_info(run_dir).get("data_dir"),
                                              cfg.data.dir]
    for cand in candidates:
        if cand and Path(cand).expanduser().is_dir():
            meta = load_meta(cand)
            if meta["vocab_size"] > cfg.model.vocab_size:
                raise DataError(f"data dir {cand}: tokenizer has {meta['vocab_size']} tokens, "
                                f"the model {cfg.model.vocab_size}; it is not this run's data")
            for split in ("test", "val"):
                if meta["tokens"].get(split):
                    docs = [d for d in iter_documents(cand, split) if len(d)]
                    return docs, f"{Path(cand).expanduser().resolve()} split {split}"
    from moelab.data.corpus import TEST_TITLES, load_default_corpus

    texts = [d["text"] for d in load_default_corpus() if d["title"] in TEST_TITLES]
    docs = [np.asarray(ids, dtype=np.int64) for ids in tok.encode_documents(texts)]
    return docs, "bundled corpus test documents (" + ", ".join(TEST_TITLES) + ")"


def _windows(docs: list[np.ndarray], eos_id: int, T: int, n: int) -> torch.Tensor:
    """n windows of T + 1 tokens at evenly spaced offsets of the EOS-joined documents."""
    stream = np.concatenate([np.concatenate([[eos_id], d]) for d in docs]).astype(np.int64)
    if len(stream) < T + 1:
        stream = np.resize(stream, T + 1)  # tiny text: repeat it rather than fail
    starts = np.linspace(0, len(stream) - T - 1, num=n).astype(np.int64)
    return torch.from_numpy(np.stack([stream[s:s + T + 1] for s in starts]))


@torch.inference_mode()
def heldout_analysis(model, windows_NT1: torch.Tensor, batch_size: int = 8) -> dict:
    """Loss, routing metrics and per-layer diagnostics of the model on held-out windows."""
    device = next(model.parameters()).device
    loads, entropies = defaultdict(list), defaultdict(list)
    attn, maxact, losses = [], [], []
    model.eval()
    for lo in range(0, windows_NT1.shape[0], batch_size):
        w_BT1 = windows_NT1[lo:lo + batch_size].to(device)
        out = model(w_BT1[:, :-1], w_BT1[:, 1:], diagnostics=True, stats=True)
        losses.append(float(out.loss) * w_BT1.shape[0])
        for key, v in out.metrics.items():
            m = ROUTER_METRIC_RE.match(key)
            if m and m.group(2) == "load":
                loads[m.group(1)].append(v.float().cpu() * w_BT1.shape[0])
            elif m and m.group(2) == "entropy":
                entropies[m.group(1)].append(float(v) * w_BT1.shape[0])
        if "attn_first_token" in out.diagnostics:
            attn.append(out.diagnostics["attn_first_token"].cpu() * w_BT1.shape[0])
        if "max_activation" in out.diagnostics:
            maxact.append(out.diagnostics["max_activation"].cpu())
    n = windows_NT1.shape[0]
    routers = {}
    for name in sorted(loads, key=_router_order):
        load_E = torch.stack(loads[name]).sum(0) / n
        routers[name] = {"n_experts": int(load_E.numel()), "load": [_r(x) for x in load_E],
                         "dead": int((load_E == 0).sum()), "max_load": _r(load_E.max()),
                         "min_load": _r(load_E.min()),
                         "entropy": _r(sum(entropies[name]) / n) if entropies[name] else None}
    return {"loss": _r(sum(losses) / n), "windows": int(n),
            "tokens": int(n * (windows_NT1.shape[1] - 1)), "routers": routers,
            "attn_first_token": [_r(x) for x in torch.stack(attn).sum(0) / n] if attn else None,
            "max_activation": ([_r(x) for x in torch.stack(maxact).amax(0)] if maxact else None)}


def _router_order(name: str):
    layer = int(re.match(r"layer(\d+)", name).group(1))
    return layer, name


def training_summary(records: list[dict]) -> dict | None:
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    if not train and not val:
        return None
    last = (train or val)[-1]
    return {"steps": int(max(r.get("step", 0) for r in records)),
            "tokens": int(max(r.get("tokens", 0) for r in records)),
            "final_train_loss": _r(train[-1]["loss"]) if train else None,
            "final_val_loss": _r(val[-1]["val_loss"]) if val else None,
            "best_val_loss": _r(min(r["val_loss"] for r in val)) if val else None,
            "val_evaluations": len(val), "last_step_tokens_per_s": _r(last.get("tokens_per_s"))}


def logged_routing(records: list[dict]) -> dict | None:
    """Expert load of the last validation line that logged load vectors (training loop)."""
    for r in reversed(records):
        loads = {m.group(1): v for k, v in r.items()
                 if (m := ROUTER_METRIC_RE.match(k)) and m.group(2) == "load"
                 and isinstance(v, list)}
        if loads:
            return {"step": int(r.get("step", 0)), "routers": {
                name: {"load": [_r(x) for x in v], "dead": int(sum(1 for x in v if x == 0))}
                for name, v in sorted(loads.items(), key=lambda kv: _router_order(kv[0]))}}
    return None


def entropy_curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    curves = defaultdict(list)
    for r in records:
        if "loss" not in r:
            continue  # training lines only: one point per logged step
        for k, v in r.items():
            m = ROUTER_METRIC_RE.match(k)
            if m and m.group(2) == "entropy" and isinstance(v, (int, float)):
                curves[m.group(1)].append((int(r["step"]), float(v)))
    return dict(sorted(curves.items(), key=lambda kv: _router_order(kv[0])))


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------
def _figure(ncols: int, width: float = 6.0, height: float = 4.2):
    try:
        from matplotlib.figure import Figure  # object API: no pyplot state, no GUI backend
    except ImportError:
        raise MissingDependencyError("matplotlib", "moelab report") from None

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_loss(records: list[dict], path: Path) -> None:
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, axes = _figure(2)
    for ax, x_key, x_label in ((axes[0], "step", "optimizer step"),
                               (axes[1], "tokens", "training tokens seen")):
        if train:
            ax.plot([r.get(x_key, 0) for r in train], [r["loss"] for r in train], lw=1,
                    label="train loss")
        if val:
            ax.plot([r.get(x_key, 0) for r in val], [r["val_loss"] for r in val], "o-", ms=4,
                    label="validation loss")
        if x_key == "tokens":
            from matplotlib.ticker import EngFormatter

            ax.xaxis.set_major_formatter(EngFormatter())  # 1.2M rather than an 1e6 offset
        ax.set_xlabel(x_label)
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.set_title(f"Loss vs {x_label}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=110)


def plot_expert_load(panels: list[tuple[str, dict]], path: Path) -> None:
    """One heatmap per (title, {router: {"load": [...]}}): rows routers, columns experts;
    dead experts are crossed out."""
    fig, axes = _figure(len(panels), width=6.5,
                        height=1.6 + 0.35 * max(len(r) for _, r in panels))
    for ax, (title, routers) in zip(axes, panels):
        names = list(routers)
        E = max(len(routers[n]["load"]) for n in names)
        grid = np.full((len(names), E), np.nan)
        for i, n in enumerate(names):
            grid[i, :len(routers[n]["load"])] = routers[n]["load"]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        dead_y, dead_x = np.nonzero(grid == 0)
        ax.scatter(dead_x, dead_y, marker="x", color="red", s=30, label="dead expert (load 0)")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xticks(range(E) if E <= 32 else range(0, E, max(1, E // 16)))
        ax.set_xlabel("expert index")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label="load (share of routed pairs)")
        if len(dead_x):
            ax.legend(loc="upper right", fontsize=8)
    fig.savefig(path, dpi=110)


def plot_entropy(curves: dict, path: Path, n_experts: set[int] = frozenset()) -> None:
    fig, axes = _figure(1, width=8)
    ax = axes[0]
    for name, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label=name)
    for E in sorted(n_experts):  # the ceiling: a router that spreads every token uniformly
        ax.axhline(math.log(E), ls="--", color="grey", lw=1, label=f"uniform over {E} (ln {E})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean per-token router entropy (nats)")
    ax.set_title("Router entropy during training (low = confident, peaked routing)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=max(1, len(curves) // 12))
    fig.savefig(path, dpi=110)


def plot_diagnostics(diag: dict, path: Path) -> None:
    fig, axes = _figure(2)
    attn, act = diag.get("attn_first_token"), diag.get("max_activation")
    if attn:
        axes[0].bar(range(len(attn)), attn, color="tab:blue")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("Attention mass on the first token (attention sink)")
    axes[0].set_ylabel("mean attention weight on token 0 (0-1)")
    if act:  # massive activations span orders of magnitude: log scale, points not bars
        axes[1].plot(range(len(act)), act, "o-", color="tab:orange")
        axes[1].set_yscale("log")
    axes[1].set_title("Largest |hidden state| after each layer")
    axes[1].set_ylabel("max |activation| (log scale)")
    n = max(len(attn or []), len(act or []))
    for ax in axes:
        ax.set_xticks(range(n) if n <= 32 else range(0, n, max(1, n // 16)))
        ax.set_xlabel("layer (depth position)")
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |"
              for row in rows]
    return "\n".join(lines)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None,
                 data_dir: str | Path | None = None, windows: int = 16,
                 device: str = "cpu") -> Path:
    """Write figures, report.md and report.json for a run; returns the path of report.md."""
    from moelab.train.metrics import read_metrics

    model, tok, cfg, ckpt, owner = load_run(run_dir, device)
    out = Path(out_dir).expanduser() if out_dir else owner / "report"
    out.mkdir(parents=True, exist_ok=True)
    records = read_metrics(owner)
    docs, source = _heldout_tokens(owner, cfg, tok, data_dir)
    T = context_length(cfg)
    held = heldout_analysis(model, _windows(docs, tok.eos_id, T, windows))
    rep: dict = {"run_dir": str(owner.resolve()), "checkpoint": ckpt.name,
                 "step": checkpoint_step(ckpt), "generated": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "heldout": {"source": source, "windows": held["windows"],
                             "tokens": held["tokens"], "seq_len": T, "loss": held["loss"]},
                 "figures": {}, "skipped": {}}
    md = [f"# Run report: {owner.name}", "",
          f"Checkpoint `{ckpt.name}` of `{owner.resolve()}`. Held-out text: {source}; "
          f"{held['windows']} windows of {T} tokens, loss {_fmt(held['loss'])} nats/token.", ""]

    md += ["## Training", ""]
    rep["training"] = training_summary(records)
    if rep["training"]:
        plot_loss(records, out / "loss.png")
        rep["figures"]["loss"] = "loss.png"
        md += [_table(["metric", "value"], [[k, v] for k, v in rep["training"].items()]), "",
               "![loss curves](loss.png)", ""]
    else:
        rep["skipped"]["training"] = "RUN_DIR/metrics.jsonl is missing or has no loss lines"
        md += ["No training curves: RUN_DIR/metrics.jsonl is missing or has no loss lines.", ""]

    md += ["## Routing", ""]
    logged = logged_routing(records)
    curves = entropy_curves(records)
    if held["routers"] or logged:
        rep["routing"] = {"heldout": held["routers"], "logged": logged}
        panels = [(f"Held-out text, {ckpt.name}", held["routers"])] if held["routers"] else []
        if logged:
            panels.append((f"Validation batches at step {logged['step']} (metrics.jsonl)",
                           logged["routers"]))
        plot_expert_load(panels, out / "expert_load.png")
        rep["figures"]["expert_load"] = "expert_load.png"
        rows = [[name, r["n_experts"], r["dead"], r["max_load"], r["min_load"], r["entropy"],
                 (logged or {}).get("routers", {}).get(name, {}).get("dead")]
                for name, r in held["routers"].items()]
        md += [_table(["router", "experts", "dead (held-out)", "max load", "min load",
                       "entropy (nats)", "dead (last logged)"], rows), "",
               "Load = share of routed (token, slot) pairs an expert received; a dead expert "
               "received none.", "", "![expert load](expert_load.png)", ""]
    else:
        rep["routing"] = None
        rep["skipped"]["routing"] = "the model has no routers (dense layers only)"
        md += ["This model has no routers (dense attention and FFN only), so there is no expert "
               "load, dead-expert count or router entropy to show.", ""]
    if curves:
        plot_entropy(curves, out / "router_entropy.png",
                     {r["n_experts"] for r in held["routers"].values()})
        rep["figures"]["router_entropy"] = "router_entropy.png"
        rep["router_entropy"] = {k: {"first_step": v[0][0], "first": _r(v[0][1]),
                                     "last_step": v[-1][0], "last": _r(v[-1][1])}
                                 for k, v in curves.items()}
        md += ["### Router entropy during training", "",
               _table(["router", "first step", "entropy (nats)", "last step", "entropy (nats)"],
                      [[k, e["first_step"], e["first"], e["last_step"], e["last"]]
                       for k, e in rep["router_entropy"].items()]), "",
               "![router entropy](router_entropy.png)", ""]
    elif rep["routing"] is not None:
        rep["skipped"]["router_entropy"] = "metrics.jsonl logs no router entropy"
        md += ["No router entropy curve: metrics.jsonl logs no router entropy.", ""]

    md += ["## Attention sink and activations", ""]
    diag = {"attn_first_token": held["attn_first_token"],
            "max_activation": held["max_activation"]}
    rep["diagnostics"] = diag
    n_layers = max(len(v) for v in diag.values() if v) if any(diag.values()) else 0
    if n_layers:
        plot_diagnostics(diag, out / "diagnostics.png")
        rep["figures"]["diagnostics"] = "diagnostics.png"
        cols = [(v or []) + [None] * (n_layers - len(v or [])) for v in diag.values()]
        rows = [[i, *(c[i] for c in cols)] for i in range(n_layers)]
        md += [_table(["layer", "attention on first token", "max abs activation"], rows), "",
               "Attention on the first token: mean softmax weight that queries (position >= 1) "
               "put on token 0, over heads and held-out windows. Max activation: largest "
               "|hidden state| in the residual stream after the layer.", "",
               "![diagnostics](diagnostics.png)", ""]
    else:
        rep["skipped"]["diagnostics"] = "the model reports no per-layer diagnostics"
        md += ["The model's layers report no diagnostics.", ""]

    import json

    (out / "report.json").write_text(json.dumps(jsonable(rep), indent=2) + "\n")
    (out / "report.md").write_text("\n".join(md))
    return out / "report.md"
