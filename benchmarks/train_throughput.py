"""Training throughput (tokens/s of a full optimizer step) of every `*-tiny` preset.

One step = forward + backward over the preset's global batch (train.batch_size x train.seq_len
random tokens, split into train.grad_accum micro-batches) + gradient clipping + fused AdamW: the
same `train_step` the training loop runs. The (preset, precision) pairs are timed round-robin,
one step each per round (--warmup untimed rounds, then --steps timed ones), so a load change on
a shared machine affects every pair alike; the table reports each pair's median step.

    python benchmarks/train_throughput.py [--steps 10] [--dtypes float32,bfloat16] [--no-write]
        [--presets P1,P2] [--set train.seq_len=1024 ...] [--compile [both]] [--device cuda]
        [--cpu-allocator reuse|system]

`--compile both` times every pair eagerly and under `torch.compile` side by side (the compile
itself happens in the untimed warm-up rounds) and writes the `train_throughput_compile` section.

MFU = model FLOPs / (step time x matmul peak). Model FLOPs of a step = 3 x 2 x the analytic
forward MACs of the global batch (`moelab.flops.count`, attention counted causally; backward =
2 x forward). The peak is measured in the same run: a large square matmul in the row's precision
on the same device (8192^3 on CUDA, 2048^3 on CPU), median of 10 after warm-up, random data.

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

from moelab.bench_results import cpu_name, time_ms, write_section
from moelab.cpu_memory import CPU_ALLOCATORS, use_cpu_allocator



PEAK_N = {"cuda": 8192, "cpu": 2048}  # matmul size of the peak measurement


def matmul_peak(dtype: str, device: torch.device) -> float:
    """Measured FLOP/s of a large square matmul in `dtype` on `device` (random operands)."""
    n = PEAK_N[device.type]
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, getattr(torch, dtype)) for _ in range(2))
    times_ms = [time_ms(lambda: torch.mm(a, b), device) for _ in range(13)][3:]  # 3 warm-ups
    return 2 * n ** 3 / (statistics.median(times_ms) / 1e3)


def make_step(preset: str, dtype: str, device: torch.device, sets: tuple[str, ...] = (),
              compile: bool = False):
    """(info dict, step function) for one (preset, precision) pair."""
    from moelab.config import load_preset
    from moelab.flops import count
    from moelab.model import MoELM
    from moelab.train.loop import compile_model
    from moelab.train.optim import build_optimizer
    from moelab.train.step import Precision, train_step

    cfg = load_preset(preset).with_overrides(list(sets))
    tc = cfg.train
    torch.manual_seed(0)
    model = MoELM(cfg.model).to(device)
    optimizer = build_optimizer(model, tc)
    fwd_model = compile_model(model) if compile else model  # what train.compile does
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
        train_step(fwd_model, optimizer, x_BT, y_BT, tc.grad_accum, tc.grad_clip, precision,
                   scaler)
        return time.perf_counter() - t0

    info = {"preset": preset, "dtype": dtype, "batch": f"{tc.batch_size}x{tc.seq_len}",
            "params": count(cfg.model)["params_total"],
            "active": count(cfg.model)["params_active"], "tokens": tc.batch_size * tc.seq_len,
            "model_flops": 6 * count(cfg.model, batch=tc.batch_size,
                                     seq_len=tc.seq_len)["macs_forward"]}
    return info, step


def bench(pairs: list[tuple], steps: int, warmup: int, device: torch.device,
          sets: tuple[str, ...] = (), compile: bool = False) -> list[dict]:
    """Time the pairs round-robin, one step each per round, so that a load change on a shared
    machine hits every pair alike; report each pair's median step and its MFU against the
    matmul peak measured here for its precision."""
    # a pair may carry its own compile flag (preset, dtype, compiled): `--compile both`
    pairs = [p if len(p) == 3 else (*p, compile) for p in pairs]
    setups = []
    for preset, dtype, comp in pairs:
        info, step = make_step(preset, dtype, device, sets, comp)
        setups.append(({**info, "compiled": comp}, step))
    peaks = {dtype: matmul_peak(dtype, device) for dtype in sorted({p[1] for p in pairs})}
    times: list[list[float]] = [[] for _ in setups]
    for r in range(warmup + steps):
        for i, (_, step) in enumerate(setups):
            dt = step()
            if r >= warmup:
                times[i].append(dt)
    rows = []
    for (info, _), ts in zip(setups, times):
        step_s = statistics.median(ts)
        rows.append({**info, "step_ms": 1000 * step_s, "tokens_per_s": info["tokens"] / step_s,
                     "model_tflops": info["model_flops"] / step_s / 1e12,
                     "peak_tflops": peaks[info["dtype"]] / 1e12,
                     "mfu": info["model_flops"] / step_s / peaks[info["dtype"]]})
    return rows


def compile_table(rows: list[dict]) -> str:
    """Eager and compiled rows of each (preset, precision) side by side."""
    eager = {(r["preset"], r["dtype"]): r for r in rows if not r["compiled"]}
    lines = ["| preset | precision | eager step (ms) | compiled step (ms) | eager tokens/s "
             "| compiled tokens/s | compiled vs eager |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        e = eager.get((r["preset"], r["dtype"]))
        if r["compiled"] and e:
            lines.append(f"| {r['preset']} | {r['dtype']} | {e['step_ms']:.1f} "
                         f"| {r['step_ms']:.1f} | {e['tokens_per_s']:,.0f} "
                         f"| {r['tokens_per_s']:,.0f} "
                         f"| {r['tokens_per_s'] / e['tokens_per_s']:.2f}x |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    by_key = {(r["preset"], r["dtype"]): r for r in rows}
    lines = ["| preset | params (active) | batch (seqs x tokens) | precision | step (ms) "
             "| tokens/s | vs float32 | model TFLOP/s | matmul peak TFLOP/s | MFU |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = by_key.get((r["preset"], "float32"))
        rel = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.2f} M ({r['active'] / 1e6:.2f} M) "
                     f"| {r['batch']} | {r['dtype']} "
                     f"| {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {rel} "
                     f"| {r['model_tflops']:.3g} | {r['peak_tflops']:.3g} | {100 * r['mfu']:.1f}% |")
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
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every preset (e.g. train.seq_len=1024)")
    ap.add_argument("--compile", nargs="?", const="on", default=None, choices=["on", "both"],
                    help="torch.compile the model; `both`: eager and compiled side by side")
    ap.add_argument("--cpu-allocator", choices=CPU_ALLOCATORS, default="reuse",
                    help="on CPU: malloc as `moelab train` sets it (train.cpu_allocator)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from moelab.train.loop import resolve_device

    device = resolve_device(args.device)
    if device.type == "cpu":
        use_cpu_allocator(args.cpu_allocator)  # as `moelab train` does
    presets = (args.presets.split(",") if args.presets
               else [p for p in preset_names() if p.endswith("-tiny")])
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    pairs = [(p, d) for p in presets for d in args.dtypes.split(",")]
    if args.compile == "both":
        pairs = [(p, d, c) for p, d in pairs for c in (False, True)]
    rows = bench(pairs, args.steps, args.warmup, device, tuple(args.sets),
                 args.compile == "on")
    cmd = "python benchmarks/train_throughput.py" + (f" {' '.join(argv)}" if argv else
                                                     (" " + " ".join(sys.argv[1:])).rstrip())
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    body = "\n".join([
        "## Training throughput" + (" (GPU)" if device.type == "cuda" else " (tiny presets)"),
        "",
        f"`{cmd}` on {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {where}. "
        f"Median of {args.steps} full optimizer steps (forward, backward, clip, fused AdamW) "
        "after warmup, timed round-robin across rows, random tokens"
        + {None: "", "on": ", torch.compile", "both": ", eager and torch.compile (the "
           "compile runs in the warm-up rounds)"}[args.compile] + ". MFU = 6 x forward MACs of the "
        "batch / step time / the matmul peak measured in this run for the row's precision."
        + (f" malloc: `{args.cpu_allocator}` (train.cpu_allocator)." if device.type == "cpu"
           else "")
        + (f" 1-minute load average before the run: {load_before:.1f} (other processes "
           "sharing the cores lower these numbers)." if load_before is not None
           and device.type == "cpu" else ""), "",
        compile_table(rows) if args.compile == "both" else table(rows)])
    print(body)
    if not args.no_write:
        # CPU and GPU runs keep separate sections: one never replaces the other
        name = "train_throughput_cuda" if device.type == "cuda" else "train_throughput"
        write_section(name + ("_compile" if args.compile == "both" else ""), body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
