"""Training throughput (tokens/s of a full optimizer step) of every `*-tiny` preset.

One step = forward + backward over the preset's global batch (train.batch_size x train.seq_len
random tokens, split into train.grad_accum micro-batches) + gradient clipping + fused AdamW: the
same `train_step` the training loop runs. The (preset, precision) pairs are timed round-robin,
one step each per round (--warmup untimed rounds, then --steps timed ones), so a load change on
a shared machine affects every pair alike; the table reports each pair's median step.

    python benchmarks/train_throughput.py [--steps 10] [--dtypes float32,bfloat16] [--no-write]

The table is printed and written to benchmarks/RESULTS.md between the
`<!-- train_throughput:start -->` / `<!-- train_throughput:end -->` markers (other sections of
that file are left alone).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from moelab.bench_results import cpu_name, write_section



def make_step(preset: str, dtype: str, device: torch.device):
    """(info dict, step function) for one (preset, precision) pair."""
    from moelab.config import load_preset
    from moelab.flops import count
    from moelab.model import MoELM
    from moelab.train.optim import build_optimizer
    from moelab.train.step import Precision, train_step

    cfg = load_preset(preset)
    tc = cfg.train
    torch.manual_seed(0)
    model = MoELM(cfg.model).to(device)
    optimizer = build_optimizer(model, tc)
    precision = Precision.from_config(dtype, device)
    scaler = precision.grad_scaler()
    g = torch.Generator().manual_seed(0)
    x_BT = torch.randint(0, cfg.model.vocab_size, (tc.batch_size, tc.seq_len), generator=g)
    y_BT = torch.randint(0, cfg.model.vocab_size, (tc.batch_size, tc.seq_len), generator=g)
    x_BT, y_BT = x_BT.to(device), y_BT.to(device)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # train_step ends with a host sync (it reads the loss), so the time is complete
        train_step(model, optimizer, x_BT, y_BT, tc.grad_accum, tc.grad_clip, precision, scaler)
        return time.perf_counter() - t0

    info = {"preset": preset, "dtype": dtype, "batch": f"{tc.batch_size}x{tc.seq_len}",
            "params": count(cfg.model)["params_total"],
            "active": count(cfg.model)["params_active"], "tokens": tc.batch_size * tc.seq_len}
    return info, step


def bench(pairs: list[tuple[str, str]], steps: int, warmup: int, device: torch.device
          ) -> list[dict]:
    """Time the pairs round-robin, one step each per round, so that a load change on a shared
    machine hits every pair alike; report each pair's median step."""
    setups = [make_step(preset, dtype, device) for preset, dtype in pairs]
    times: list[list[float]] = [[] for _ in setups]
    for r in range(warmup + steps):
        for i, (_, step) in enumerate(setups):
            dt = step()
            if r >= warmup:
                times[i].append(dt)
    rows = []
    for (info, _), ts in zip(setups, times):
        step_s = statistics.median(ts)
        rows.append({**info, "step_ms": 1000 * step_s, "tokens_per_s": info["tokens"] / step_s})
    return rows


def table(rows: list[dict]) -> str:
    by_key = {(r["preset"], r["dtype"]): r for r in rows}
    lines = ["| preset | params (active) | batch (seqs x tokens) | precision | step (ms) "
             "| tokens/s | vs float32 |", "|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        base = by_key.get((r["preset"], "float32"))
        rel = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.2f} M ({r['active'] / 1e6:.2f} M) "
                     f"| {r['batch']} | {r['dtype']} "
                     f"| {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {rel} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from moelab.config import preset_names

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=None, help="comma-separated (default: every *-tiny)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (one step per row each)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from moelab.train.loop import resolve_device

    device = resolve_device(args.device)
    presets = (args.presets.split(",") if args.presets
               else [p for p in preset_names() if p.endswith("-tiny")])
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = bench([(p, d) for p in presets for d in args.dtypes.split(",")], args.steps,
                 args.warmup, device)
    cmd = "python benchmarks/train_throughput.py" + (f" {' '.join(argv)}" if argv else
                                                     (" " + " ".join(sys.argv[1:])).rstrip())
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    body = "\n".join([
        "## Training throughput (tiny presets)", "",
        f"`{cmd}` on {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {where}. "
        f"Median of {args.steps} full optimizer steps (forward, backward, clip, fused AdamW) "
        "after warmup, timed round-robin across rows, random tokens."
        + (f" 1-minute load average before the run: {load_before:.1f} (other processes "
           "sharing the cores lower these numbers)." if load_before is not None
           and device.type == "cpu" else ""), "", table(rows)])
    print(body)
    if not args.no_write:
        write_section("train_throughput", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
