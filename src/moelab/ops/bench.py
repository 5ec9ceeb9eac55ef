"""MoE-layer benchmark: forward+backward of routed expert FFNs against a same-FLOPs dense FFN.

What is timed (per step, median over repeats, dense and every backend interleaved in one run):
- dense: y = act(x W1) W2 with hidden width k * d_expert, backward to x, W1, W2.
- MoE:   build_plan(expert_idx) + expert_ffn (gather, both expert matmuls, weighted combine) and
         its backward to x, W1, W2 and the router weights. The router itself (logits, softmax,
         top-k) is excluded: its cost is the same for every backend and the dense layer has none.
Routing is top-k of a softmax over random logits (roughly balanced), a new draw every step. Low precision means pure
bf16 tensors (parameters and activations), not autocast; router weights stay float32.
ratio = dense_ms / moe_ms; 1.0 means the routed layer is as fast as the dense one.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

from moelab.bench_results import (cpu_features, cpu_name, load_average, markers, time_ms,
                                  write_section)
from moelab.ops.activations import act_forward
from moelab.ops.backends import BACKENDS, triton_available
from moelab.ops.expert_ffn import expert_ffn
from moelab.ops.plan import build_plan
from moelab.ops.reference import reference_expert_ffn

SHAPES = {
    "coarse": dict(d_model=512, n_experts=8, d_expert=1024, top_k=2),
    "fine": dict(d_model=512, n_experts=64, d_expert=128, top_k=8),
    "tiny": dict(d_model=32, n_experts=8, d_expert=16, top_k=2),  # smoke tests only
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ALL_BACKENDS = ("reference",) + BACKENDS + ("auto",)
ROW_KEYS = ("shape", "dtype", "backend", "dense_ms", "moe_ms", "ratio")
START, END = "<!-- moe_layer:start -->", "<!-- moe_layer:end -->"  # CPU; GPU: moe_layer_cuda
ACTIVATION = "silu"


def _available(backend: str, device: torch.device) -> bool:
    return backend != "triton" or (device.type == "cuda" and triton_available())


def _setup(shape: dict, dtype: torch.dtype, n_tokens: int, device: torch.device, seed: int,
           n_routings: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    d, E, h, k = shape["d_model"], shape["n_experts"], shape["d_expert"], shape["top_k"]

    def param(*size):
        return (torch.randn(*size, generator=gen) * 0.02).to(device, dtype).requires_grad_()

    x = torch.randn(n_tokens, d, generator=gen).to(device, dtype).requires_grad_()
    g = torch.randn(n_tokens, d, generator=gen).to(device, dtype)
    # A fresh routing decision per step, as in training: per-expert counts change every step
    # (which matters: CPU bf16 matmul kernels are compiled per shape). Every backend sees the
    # same sequence of routings.
    routings = []
    for _ in range(n_routings):
        logits = torch.randn(n_tokens, E, generator=gen).to(device)
        weights, idx = logits.softmax(-1).topk(k, dim=-1)
        routings.append((idx, weights.requires_grad_()))
    dense = (param(d, k * h), param(k * h, d))
    moe = (param(E, d, h), param(E, h, d))
    return x, g, routings, dense, moe, E


def _steps(x, g, routings, dense, moe, E):
    def dense_step(i):
        y = act_forward(ACTIVATION, x @ dense[0]) @ dense[1]
        y.backward(g)

    def moe_step(backend):
        def step(i):
            idx, weights = routings[i % len(routings)]
            plan = build_plan(idx, E)
            if backend == "reference":
                y = reference_expert_ffn(x, moe[0], moe[1], plan, weights, ACTIVATION)
            else:
                y = expert_ffn(x, moe[0], moe[1], plan, weights, ACTIVATION, backend=backend)
            y.backward(g)
        return step

    return dense_step, moe_step


def _clear(tensors):
    for t in tensors:
        t.grad = None


def run_benchmark(shapes=("coarse", "fine"), dtypes=("float32", "bfloat16"),
                  backends=ALL_BACKENDS, repeats: int = 5, n_tokens: int = 8192,
                  warmup: int = 2, threads: int | None = 2, device: str = "cpu",
                  seed: int = 0) -> list[dict]:
    """Rows {shape, dtype, backend, dense_ms, moe_ms, ratio}; see the module docstring."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    rows = []
    for shape_name in shapes:
        for dtype_name in dtypes:
            x, g, routings, dense, moe, E = _setup(SHAPES[shape_name], DTYPES[dtype_name],
                                                   n_tokens, dev, seed, warmup + repeats)
            leaves = (x,) + tuple(w for _, w in routings) + dense + moe
            dense_step, moe_step = _steps(x, g, routings, dense, moe, E)
            names = [b for b in backends if _available(b, dev)]
            steps = {"dense": dense_step} | {b: moe_step(b) for b in names}
            times = {name: [] for name in steps}
            order = list(steps)
            for it in range(warmup + repeats):
                # Interleaved, so machine noise hits every row alike, and rotated every round:
                # a step runs faster right after one that left freed memory in the allocator
                # (no page faults), so no row may always follow the same neighbour.
                rot = it % len(order)
                for name in order[rot:] + order[:rot]:
                    step = steps[name]
                    _clear(leaves)
                    ms = time_ms(lambda: step(it), dev)
                    if it >= warmup:
                        times[name].append(ms)
            dense_ms = statistics.median(times["dense"])
            for b in names:
                moe_ms = statistics.median(times[b])
                rows.append(dict(shape=shape_name, dtype=dtype_name, backend=b,
                                 dense_ms=round(dense_ms, 3), moe_ms=round(moe_ms, 3),
                                 ratio=round(dense_ms / moe_ms, 4)))
            _clear(leaves)
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| shape | dtype | backend | dense ms | MoE ms | ratio |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['backend']} | {r['dense_ms']:.1f} "
                     f"| {r['moe_ms']:.1f} | {r['ratio']:.3f} |")
    return "\n".join(lines)


def device_description(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return f"GPU: {torch.cuda.get_device_name(torch.device(device))}"
    return f"CPU: {cpu_name()} ({cpu_features()}), threads: {torch.get_num_threads()}"


def results_section(rows: list[dict], command: str, n_tokens: int, repeats: int,
                    load_before: str | None = None, device: str = "cpu") -> str:
    shapes = "; ".join(f"{n}: d={s['d_model']}, {s['n_experts']} experts of {s['d_expert']}, "
                       f"top-{s['top_k']}" for n, s in SHAPES.items()
                       if any(r["shape"] == n for r in rows))
    start, end = markers(section_name(device))
    return "\n".join([
        start,
        "## MoE layer: routed experts vs same-FLOPs dense FFN"
        + (" (GPU)" if device.startswith("cuda") else ""),
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today().isoformat()}, torch {torch.__version__}, "
        f"{device_description(device)}, 1-minute load average before "
        f"the run: {load_before or load_average()} (other processes sharing the cores lower "
        "these numbers, the MoE rows more than the dense ones)  ",
        f"{n_tokens} tokens; {shapes}; activation {ACTIVATION}, non-gated; median of {repeats} "
        "forward+backward steps after warm-up, dense and every backend interleaved (order rotated "
        "every round). MoE time "
        "includes the plan build and the combine, excludes the router; routing = top-k of a "
        "softmax over random logits, redrawn every step. bf16 = pure bf16 tensors (not "
        "autocast), router weights float32. ratio = dense_ms / moe_ms.",
        "",
        markdown_table(rows),
        end,
    ])


def section_name(device: str = "cpu") -> str:
    """CPU and GPU runs keep separate sections of RESULTS.md: one never replaces the other."""
    return "moe_layer_cuda" if device.startswith("cuda") else "moe_layer"


def write_results(section: str, path: Path | None = None, device: str = "cpu") -> Path:
    return write_section(section_name(device), section, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moe_layer", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--quick", action="store_true", help="few tokens and repeats (smoke test)")
    p.add_argument("--write-results", action="store_true",
                   help="replace the moe_layer section of benchmarks/RESULTS.md")
    p.add_argument("--results-file", default=None, help="RESULTS.md path (default: repo's)")
    p.add_argument("--shapes", nargs="+", default=["coarse", "fine"], choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--backends", nargs="+", default=list(ALL_BACKENDS), choices=ALL_BACKENDS)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu | cuda (the triton row needs cuda)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    n_tokens = args.tokens or (512 if args.quick else 8192)
    repeats = args.repeats or (2 if args.quick else 7)
    load_before = load_average()
    rows = run_benchmark(shapes=args.shapes, dtypes=args.dtypes, backends=args.backends,
                         repeats=repeats, n_tokens=n_tokens, threads=args.threads,
                         device=args.device)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(markdown_table(rows))
    if args.write_results:
        command = "python benchmarks/moe_layer.py " + " ".join(
            sys.argv[1:] if argv is None else argv)
        path = write_results(results_section(rows, command.strip(), n_tokens, repeats,
                                             load_before, args.device), args.results_file,
                             args.device)
        print(f"wrote {path}", file=sys.stderr)
    return 0
