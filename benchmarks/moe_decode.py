"""Routed experts at decode sizes (inference, no gradient): every backend and the gathered path.

What is timed (microseconds per call, median over interleaved rounds, one thread by default):
- loop / padded / grouped_mm / scatter: `build_plan` + `expert_ffn` with that backend;
- gathered: `gathered_expert_ffn` (per-pair expert weights gathered, one bmm per matmul, no plan);
- auto: what `ExpertBank.route` does (the gathered path or a plan and the automatic backend).
A fresh top-k routing of random logits per call. Shapes: the FFN experts of moe-tiny (SwiGLU,
16 x 128, top-2), sigma-moe-tiny (ReLU, 32 x 96, top-8) and the `fine` shape of
benchmarks/moe_layer.py (64 x 128, top-8, d 512). The constants of `ops/backends.py`
(INFER_GROUPED_MAX_PAIRS_PER_EXPERT) and `ops/gathered.py` come from this table.

    python benchmarks/moe_decode.py [--threads 1] [--rounds 5] [--write-results]
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import torch

from moelab.bench_results import cpu_features, cpu_name, load_average, write_section
from moelab.layers.experts import ExpertBank
from moelab.ops.expert_ffn import expert_ffn
from moelab.ops.gathered import gathered_expert_ffn
from moelab.ops.plan import build_plan

SHAPES = {  # d, E, h, k, gated, activation
    "moe-tiny": (192, 16, 128, 2, True, "silu"),
    "sigma-moe-tiny": (192, 32, 96, 8, False, "relu"),
    "fine": (512, 64, 128, 8, False, "silu"),
}
TOKENS = (1, 2, 4, 8, 16, 32)
BACKENDS = ("loop", "padded", "grouped_mm", "scatter", "gathered", "auto")


def run(shapes, dtypes, tokens, rounds: int, calls: int = 20) -> list[dict]:
    rows = []
    for dt_name in dtypes:
        dt = getattr(torch, dt_name)
        for name in shapes:
            d, E, h, k, gated, act = SHAPES[name]
            torch.manual_seed(0)
            bank = ExpertBank(E, d, h, activation=act, gated=gated).to(dt).requires_grad_(False)
            w1, w2, w3 = bank.w1_EDH, bank.w2_EHD, bank.w3_EDH
            for T in tokens:
                x = torch.randn(T, d, dtype=dt)
                routings = [torch.randn(T, E).softmax(-1).topk(k, -1) for _ in range(calls)]
                routings = [(i, w.to(dt)) for w, i in routings]

                def make(b):
                    if b == "gathered":
                        return lambda i, w: gathered_expert_ffn(x, w1, w2, i, w, act, w3)
                    if b == "auto":
                        return lambda i, w: bank.route(x, i, w)
                    return lambda i, w: expert_ffn(x, w1, w2, build_plan(i, E), w, act, w3,
                                                   backend=b)

                fns = {b: make(b) for b in BACKENDS}
                times = {b: [] for b in BACKENDS}
                with torch.no_grad():
                    for f in fns.values():  # warm-up (oneDNN kernels, allocator)
                        for i, w in routings[:3]:
                            f(i, w)
                    for r in range(rounds):
                        order = BACKENDS[r % len(BACKENDS):] + BACKENDS[:r % len(BACKENDS)]
                        for b in order:
                            t0 = time.perf_counter()
                            for i, w in routings:
                                fns[b](i, w)
                            times[b].append((time.perf_counter() - t0) / calls * 1e6)
                med = {b: statistics.median(v) for b, v in times.items()}
                best = min((b for b in BACKENDS if b != "auto"), key=med.get)
                rows.append({"shape": name, "dtype": dt_name, "tokens": T,
                             "pairs_per_expert": T * k / E, **{b: round(med[b], 1)
                                                               for b in BACKENDS},
                             "best": best})
    return rows


def table(rows) -> str:
    head = "| shape | dtype | tokens | pairs/expert | " + " | ".join(
        f"{b} us" for b in BACKENDS) + " | fastest |"
    lines = [head, "|---|---|---:|---:|" + "---:|" * len(BACKENDS) + "---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['tokens']} | "
                     f"{r['pairs_per_expert']:.2f} | "
                     + " | ".join(f"{r[b]:.0f}" for b in BACKENDS) + f" | {r['best']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = load_average()
    rows = run(args.shapes, args.dtypes, args.tokens, args.rounds)
    given = sys.argv[1:] if argv is None else argv
    body = "\n".join([
        "## Routed experts at decode sizes (inference): backends and the gathered path", "",
        f"Command: `python benchmarks/moe_decode.py {' '.join(given)}`  ",
        f"Date: {datetime.date.today().isoformat()}, torch {torch.__version__}, CPU: "
        f"{cpu_name()} ({cpu_features()}), threads: {torch.get_num_threads()}, 1-minute load "
        f"average before/after: {load_before} / {load_average()}  ",
        "Microseconds per call (plan build included for the plan-based backends; `auto` = "
        "`ExpertBank.route`), median of interleaved rounds of 20 calls, fresh routing per call.",
        "", table(rows)])
    print(body)
    if args.write_results:
        print(f"wrote {write_section('moe_decode', body)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
