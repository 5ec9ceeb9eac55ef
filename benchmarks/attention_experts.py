"""Attention experts vs dense attention: forward+backward time per token of one attention layer.

Rows at two widths, each timed against the dense attention of the same width:
- tiny (d 192, batch 16 x 128): the attention of dense-tiny, switchhead-tiny, moa-tiny and
  umoe-att-tiny (sized so that whole-model MACs match dense-tiny's);
- base (d 768, batch 2 x 512): the UMoE paper's base dense, MoA and UMoE-Att attention, and a
  SwitchHead of 4 heads x 192 with 29 experts per head, top-1 (no base config ships with the
  paper's code; 29 experts reproduce its 533M-parameter base SwitchHead).

A step is one layer: forward on a random normed input, balance losses, backward into the input
and every weight (the routed engine's automatic backend). Rows are timed round-robin, one step
each per round (--warmup untimed rounds, then --steps timed ones), so a load change on a shared
machine hits every row alike; the table reports each row's median. MACs are the layer's
analytic forward MACs per token (causal attention), as `moelab.flops` counts them.

    python benchmarks/attention_experts.py [--steps 7] [--threads 2] [--no-write]
        [--cpu-allocator reuse|system] [--profile base:switchhead]

The process's malloc is set up as `moelab train` sets it up on CPU (`train.cpu_allocator`,
default `reuse`: large freed blocks stay mapped, moelab/cpu_memory.py); `--cpu-allocator system`
leaves glibc's default, under which every step page-faults the expert gradients in afresh.

The table is printed and written to benchmarks/RESULTS.md between the
`<!-- attention_experts:start -->` / `<!-- attention_experts:end -->` markers (with
`--cpu-allocator system`: `attention_experts_system_malloc`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from moelab.bench_results import cpu_name, write_section
from moelab.cpu_memory import CPU_ALLOCATORS, use_cpu_allocator

BASE_SWITCHHEAD = ["model.attention.kind=switchhead", "model.attention.n_heads=4",
                   "model.attention.head_dim=192", "model.attention.n_experts=29",
                   "model.attention.top_k=1"]
# (width, label, preset, overrides, batch, seq_len); the first row of a width is its reference
ROWS = [
    ("tiny", "dense", "dense-tiny", [], 16, 128),
    ("tiny", "switchhead", "switchhead-tiny", [], 16, 128),
    ("tiny", "moa", "moa-tiny", [], 16, 128),
    ("tiny", "umoe_att", "umoe-att-tiny", [], 16, 128),
    ("base", "dense", "umoe-paper-base-dense", [], 2, 512),
    ("base", "switchhead", "umoe-paper-base-dense", BASE_SWITCHHEAD, 2, 512),
    ("base", "moa", "umoe-paper-base-moa", [], 2, 512),
    ("base", "umoe_att", "umoe-paper-base-umoe-att", [], 2, 512),
]


def make_step(preset: str, sets: list[str], batch: int, seq_len: int):
    """(info, step function) for one attention layer."""
    from moelab.config import load_preset
    from moelab.layers.base import ForwardContext
    from moelab.layers.routers import finish_entropy_losses
    from moelab.registry import ATTENTION

    cfg = load_preset(preset).with_overrides(sets).model
    cls = ATTENTION.get(cfg.attention.kind)
    torch.manual_seed(0)
    layer = cls(cfg, 0, shared={}).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq_len, cfg.d_model, generator=g).requires_grad_(True)
    dy = torch.randn(batch, seq_len, cfg.d_model, generator=g)

    def step() -> float:
        t0 = time.perf_counter()
        layer.zero_grad(set_to_none=True)
        x.grad = None
        ctx = ForwardContext()
        y = layer(x, None, 0, ctx)
        finish_entropy_losses(ctx)
        loss = (y * dy).sum() + sum(ctx.aux_losses.values(), torch.zeros(()))
        loss.backward()
        return time.perf_counter() - t0

    c = cls.count(cfg, seq_len)
    a = cfg.attention
    shape = (f"{a.n_heads} heads x {cfg.head_dim}" if a.kind == "dense" else
             f"{a.n_experts} experts, top-{a.top_k}" + (f" + {min(a.n_shared_experts, 1)} shared"
                                                       if a.n_shared_experts else "")
             + (f" per head x {a.n_heads} heads" if a.kind == "switchhead" else ""))
    info = {"kind": a.kind, "config": preset + (" (modified)" if sets else ""), "shape": shape,
            "params": c.params, "macs_per_token": c.macs / seq_len, "tokens": batch * seq_len,
            "batch": f"{batch}x{seq_len}"}
    return info, step


def bench(steps: int, warmup: int) -> list[dict]:
    setups = [(width, *make_step(preset, sets, b, t)) for width, _, preset, sets, b, t in ROWS]
    times: list[list[float]] = [[] for _ in setups]
    for r in range(warmup + steps):
        for i, (_, _, step) in enumerate(setups):
            dt = step()
            if r >= warmup:
                times[i].append(dt)
    rows, ref = [], {}
    for (width, info, _), ts in zip(setups, times):
        row = {"width": width, **info, "step_ms": 1000 * statistics.median(ts)}
        row["us_per_token"] = 1000 * row["step_ms"] / info["tokens"]
        ref.setdefault(width, row)
        row["macs_ratio"] = row["macs_per_token"] / ref[width]["macs_per_token"]
        row["time_ratio"] = row["us_per_token"] / ref[width]["us_per_token"]
        rows.append(row)
    return rows


def profile_row(which: str, warmup: int) -> int:
    """Where one row's step goes: the profiler's table, by self CPU time."""
    from torch.profiler import profile

    found = [r for r in ROWS if f"{r[0]}:{r[1]}" == which]
    if not found:
        raise SystemExit(f"--profile {which!r}: expected one of "
                         + ", ".join(f"{r[0]}:{r[1]}" for r in ROWS))
    _, _, preset, sets, b, t = found[0]
    _, step = make_step(preset, sets, b, t)
    for _ in range(max(warmup, 1)):
        step()
    with profile() as prof:
        ms = 1000 * step()
    print(f"{which}: one step {ms:.1f} ms (under the profiler)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


def table(rows: list[dict]) -> str:
    lines = ["| width | kind | config | experts | attn params | batch | MACs/token | "
             "MACs vs dense | fwd+bwd (ms) | us/token | time vs dense |",
             "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['kind']} | {r['config']} | {r['shape']} "
                     f"| {r['params'] / 1e6:.2f} M | {r['batch']} "
                     f"| {r['macs_per_token'] / 1e6:.3f} M | {r['macs_ratio']:.2f}x "
                     f"| {r['step_ms']:.1f} | {r['us_per_token']:.2f} | {r['time_ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=7, help="timed rounds (one step per row each)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    ap.add_argument("--cpu-allocator", choices=CPU_ALLOCATORS, default="reuse",
                    help="malloc as `moelab train` sets it (reuse) or glibc's default")
    ap.add_argument("--profile", metavar="WIDTH:KIND", default=None,
                    help="print torch.profiler's op table of one step of that row (e.g. "
                         "base:switchhead) instead of the benchmark")
    args = ap.parse_args(argv)
    use_cpu_allocator(args.cpu_allocator)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        return profile_row(args.profile, args.warmup)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = bench(args.steps, args.warmup)
    given = argv if argv is not None else sys.argv[1:]
    cmd = " ".join(["python benchmarks/attention_experts.py", *given])
    body = "\n".join([
        "## Attention experts vs dense attention (one layer, forward+backward, CPU)", "",
        f"`{cmd}` on {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {cpu_name()}, "
        f"{os.cpu_count()} cores, {torch.get_num_threads()} threads. Median of {args.steps} "
        "steps (forward, balance losses, backward into input and weights) after warmup, "
        "timed round-robin across rows, float32, routed engine backend `auto`. MACs: the "
        f"layer's analytic forward MACs per token (causal). malloc: `{args.cpu_allocator}` "
        "(train.cpu_allocator). Ratios are to the dense attention "
        "of the same width; the tiny rows are the attention layers of MAC-matched presets, "
        "the base rows the UMoE paper's base configs (UMoE-Att mixes d-wide values, hence its "
        "higher MACs)."
        + (f" 1-minute load average before the run: {load_before:.1f} (other processes "
           "sharing the cores lower these numbers)." if load_before is not None else ""),
        "", table(rows)])
    print(body)
    if not args.no_write:
        write_section("attention_experts" + ("_system_malloc" if args.cpu_allocator == "system"
                                             else ""), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
