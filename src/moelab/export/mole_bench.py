"""MoLE decode benchmark: per-token decode latency of equal-active-compute models on CPU.

    moelab bench mole-decode [--json] [--write-results]     (benchmarks/mole_decode.py)

Models (same prompt, greedy decoding, timed in lockstep in one run; see PHASES):
- dense:          Pythia-style decoder, non-gated GELU FFN of width F.
- moe:            Mixtral-like MoE-10E: 10 experts of F/2, top-2 (same active FFN width), in RAM.
- moe-offloaded:  the same MoE with its experts in a file (fp16): for every forward the experts
                  the router picked are read from the mmapped file (exact byte ranges announced
                  with MADV_WILLNEED, MADV_RANDOM otherwise) and run through the engine. This is
                  the MoLE paper's offloading baseline (its Fig. 3), without an expert cache.
- mole-ram:       MoLE-4E converted to an fp16 lookup table held in RAM (shared expert of F).
- mole-disk:      the same table memory-mapped from disk; each forward announces its tokens'
                  rows with POSIX_FADV_WILLNEED, then every layer gathers its rows from the map.
Disk-backed rows are timed `warm` (the page cache holds what was touched before) and `cold`
(before every decode step the file's pages are dropped from the mapping and the page cache with
madvise/posix_fadvise(DONTNEED), as for tables or experts larger than RAM; the eviction itself
is not timed and /proc/self/io read_bytes shows the reads really hit the disk).
"""
from __future__ import annotations

import argparse
import datetime
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from moelab.bench_results import cpu_features, cpu_name, load_average, write_section
from moelab.config import Config, load_preset
from moelab.layers.base import ForwardContext
from moelab.model import MoELM
from moelab.ops import build_plan, expert_ffn

START, END = "<!-- mole_decode:start -->", "<!-- mole_decode:end -->"
SIZES = {
    "default": dict(vocab=16384, d_model=512, n_layers=4, n_heads=8, d_ff=2048),
    "quick": dict(vocab=512, d_model=64, n_layers=2, n_heads=2, d_ff=128),  # smoke test
}
MOE_EXPERTS, MOLE_EXPERTS = 10, 4  # the paper's MoE-10E vs MoLE-4E: equal train params too


def bench_configs(s: dict, max_len: int) -> dict[str, Config]:
    common = [f"model.vocab_size={s['vocab']}", f"model.d_model={s['d_model']}",
              f"model.n_layers={s['n_layers']}", f"model.attention.n_heads={s['n_heads']}",
              f"model.max_seq_len={max_len}", f"train.seq_len={max_len}",
              f"model.ffn.d_ff={s['d_ff']}"]
    return {
        "dense": load_preset("mole-paper-160m-dense").with_overrides(common),
        "moe": load_preset("mole-paper-160m-moe10e").with_overrides(
            common + [f"model.ffn.n_experts={MOE_EXPERTS}",
                      f"model.ffn.expert_dim={s['d_ff'] // 2}"]),
        "mole": load_preset("mole-paper-160m-mole4e").with_overrides(
            common + [f"model.ffn.n_experts={MOLE_EXPERTS}", f"model.ffn.top_k={MOLE_EXPERTS}",
                      f"model.ffn.expert_dim={s['d_ff']}"]),
    }


class ExpertStore:
    """Every MoE layer's experts in one file, (layer, expert, [w1 | w2] fp16 bytes)."""

    def __init__(self, path: Path, model: MoELM):
        banks = [b.ffn.experts for b in model.layers]
        E, D, H = banks[0].w1_EDH.shape
        self.shape = (len(banks), E, 2 * D * H * 2)
        self.D, self.H = D, H
        with open(path, "wb") as f:
            for bank in banks:
                for e in range(E):
                    f.write(bank.w1_EDH[e].detach().half().numpy().tobytes())
                    f.write(bank.w2_EHD[e].detach().half().numpy().tobytes())
        self.fd = os.open(path, os.O_RDONLY)
        self.mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        self.mm.madvise(mmap.MADV_RANDOM)  # no read-around: WILLNEED announces exact ranges
        self.table = _readonly_tensor(self.mm, self.shape)
        self.bytes_read = 0

    def read(self, layer: int, used_U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L, E, R = self.shape
        for e in used_U.tolist():
            self.mm.madvise(mmap.MADV_WILLNEED, (layer * E + e) * R, R)
        rec_UR = self.table[layer].index_select(0, used_U)
        self.bytes_read += rec_UR.numel()
        half = rec_UR.view(torch.float16)
        U, DH = len(used_U), self.D * self.H
        return (half[:, :DH].reshape(U, self.D, self.H).float(),
                half[:, DH:].reshape(U, self.H, self.D).float())

    def evict(self) -> None:
        self.mm.madvise(mmap.MADV_DONTNEED)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _readonly_tensor(buf, shape) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.frombuffer(buf, np.uint8).reshape(shape))


class OffloadedMoEFFN(nn.Module):
    """A MoE FFN whose routed experts are read from an `ExpertStore` on every forward."""

    def __init__(self, ffn: nn.Module, store: ExpertStore, layer: int):
        super().__init__()
        self.router, self.router_norm = ffn.router, ffn.router_norm
        self.activation = ffn.experts.activation
        self.store, self.layer = store, layer

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, D = x_BTD.shape
        r = self.router(self.router_norm(x_BTD), ctx)
        used_U, local_TK = torch.unique(r.idx_BTK.reshape(B * T, -1), return_inverse=True)
        w1_UDH, w2_UHD = self.store.read(self.layer, used_U)
        plan = build_plan(local_TK, len(used_U))
        y_TD = expert_ffn(x_BTD.reshape(B * T, D), w1_UDH, w2_UHD, plan,
                          r.weights_BTK.reshape(B * T, -1).to(x_BTD.dtype), self.activation)
        return y_TD.view(B, T, D)


def build_models(work: Path, size: str, max_len: int, seed: int = 0) -> dict:
    """name[/cache] -> (model, evict function or None, object counting bytes_read)."""
    from moelab.export.mole_lut import convert_model
    from moelab.export.mole_model import load_converted

    cfgs = bench_configs(SIZES[size], max_len)
    torch.manual_seed(seed)
    dense = MoELM(cfgs["dense"].model).eval()
    moe = MoELM(cfgs["moe"].model).eval()
    torch.manual_seed(seed)
    offloaded = MoELM(cfgs["moe"].model).eval()
    offloaded.load_state_dict(moe.state_dict())
    store = ExpertStore(work / "experts.bin", offloaded)
    for i, block in enumerate(offloaded.layers):
        block.ffn = OffloadedMoEFFN(block.ffn, store, i)
    lut = work / "mole-lut"
    if not (lut / "mole_lut.json").is_file():
        mole = MoELM(cfgs["mole"].model).eval()
        convert_model(mole, cfgs["mole"], lut, dtype="fp16")
        del mole
    ram = load_converted(lut, storage="ram")
    disk = load_converted(lut, storage="mmap")
    return {
        "dense": (dense, None, None),
        "moe": (moe, None, None),
        "moe-offloaded/warm": (offloaded, None, store),
        "moe-offloaded/cold": (offloaded, store.evict, store),
        "mole-ram": (ram, None, ram.tables),
        "mole-disk/warm": (disk, None, disk.tables),
        "mole-disk/cold": (disk, disk.tables.evict, disk.tables),
    }


class _Run:
    """One model decoding one batch: its KV cache and the last token."""

    def __init__(self, key, model, evict, counter, prompt_BT):
        self.key, self.model, self.evict, self.counter = key, model, evict, counter
        self.cache = model.new_cache()
        self.tok = model(prompt_BT, cache=self.cache).logits[:, -1].argmax(-1, keepdim=True)

    def step(self) -> tuple[float, int, int]:
        """One greedy decode step: (ms, bytes moved from the store, bytes read from disk)."""
        if self.evict is not None:
            self.evict()
        b0, d0 = (self.counter.bytes_read if self.counter else 0), _disk_read_bytes()
        t0 = time.perf_counter()
        self.tok = self.model(self.tok, cache=self.cache).logits[:, -1].argmax(-1, keepdim=True)
        ms = (time.perf_counter() - t0) * 1e3
        return ms, (self.counter.bytes_read if self.counter else 0) - b0, _disk_read_bytes() - d0


# Warm and cold runs of one file cannot be interleaved (an eviction makes the next warm step
# cold), so they are timed in separate phases, each with the dense model as its own reference.
# Each cold variant gets a phase of its own: the step that follows a cold offloaded-MoE step
# (16 MB read from disk, page cache churn) runs measurably slower, and that must not be charged
# to whichever model happens to come next.
PHASES = (("dense", "moe", "moe-offloaded/warm", "mole-ram", "mole-disk/warm"),
          ("dense", "moe-offloaded/cold"),
          ("dense", "mole-disk/cold"))


def time_phase(models: dict, names, prompt_BT: torch.Tensor, steps: int, rounds: int) -> dict:
    """Lockstep decoding: step i of every model runs back to back, so that load from other
    processes hits all models alike; the order rotates every step, so that no model always
    follows the same neighbour; ratios are medians of per-step ratios to dense."""
    acc = {n: {"ms": [], "ratio": [], "moved": 0, "disk": 0, "n": 0} for n in names}
    with torch.no_grad():
        for rnd in range(rounds + 1):  # round 0 warms every model up and is dropped
            runs = [_Run(n, *models[n], prompt_BT) for n in names]
            for i in range(steps):
                k = i % len(runs)
                res = {r.key: r.step() for r in runs[k:] + runs[:k]}
                if rnd == 0 or i == 0:
                    continue
                for n, (ms, moved, disk) in res.items():
                    a = acc[n]
                    a["ms"].append(ms)
                    a["ratio"].append(ms / res["dense"][0])
                    a["moved"] += moved
                    a["disk"] += disk
                    a["n"] += 1
    return acc


def run_benchmark(size: str = "default", batches=(1, 8), prompt: int = 256, steps: int = 24,
                  rounds: int = 4, work: Path | None = None, seed: int = 0) -> list[dict]:
    tmp = None
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="moelab-mole-bench-")
        work = Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    models = {}
    try:
        models = build_models(work, size, prompt + steps + 1, seed)
        gen = torch.Generator().manual_seed(seed)
        rows = []
        for B in batches:
            prompt_BT = torch.randint(0, SIZES[size]["vocab"], (B, prompt), generator=gen)
            for phase in PHASES:
                acc = time_phase(models, phase, prompt_BT, steps, rounds)
                for n, a in acc.items():
                    if n == "dense" and phase is not PHASES[0]:
                        continue
                    name, _, cache = n.partition("/")
                    rows.append(dict(
                        model=name, cache=cache or "-", batch=B,
                        ms_per_token=round(statistics.median(a["ms"]), 3),
                        ratio_to_dense=round(statistics.median(a["ratio"]), 3),
                        bytes_per_token=int(a["moved"] / a["n"] / B),
                        bytes_per_step=int(a["moved"] / a["n"]),
                        disk_read_per_step=int(a["disk"] / a["n"]),
                        resident_mb=round(resident_bytes(models[n][0]) / 2**20, 1)))
        return rows
    finally:
        for model, _, _ in models.values():
            if hasattr(model, "tables") and model.tables.table_VLR is not None:
                model.tables.close()
        if tmp is not None:
            tmp.cleanup()


def _disk_read_bytes() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def resident_bytes(model) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    tables = getattr(model, "tables", None)
    return params + (tables.resident_bytes if tables is not None else 0)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def _mb(n: float) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB" if n else "0"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | cache | batch | ms / token | vs dense | moved / token | disk reads / step "
             "| resident |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['cache']} | {r['batch']} | {r['ms_per_token']:.2f} "
                     f"| {r['ratio_to_dense']:.2f}x | {_mb(r['bytes_per_token'])} "
                     f"| {_mb(r['disk_read_per_step'])} | {r['resident_mb']:.0f} MB |")
    return "\n".join(lines)


def speedups(rows: list[dict]) -> dict:
    """(cache, batch) -> how many times faster mole-disk decodes than moe-offloaded. Taken from
    the ratios to dense, because the two may come from different phases (each ratio is
    relative to the dense steps timed next to it)."""
    by = {(r["model"], r["cache"], r["batch"]): r for r in rows}
    return {(c, b): by[("moe-offloaded", c, b)]["ratio_to_dense"] / r["ratio_to_dense"]
            for (name, c, b), r in by.items()
            if name == "mole-disk" and ("moe-offloaded", c, b) in by}


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's targets: MoLE from disk <= 1.1x dense and >= 3x faster than offloaded MoE."""
    out = []
    fast = speedups(rows)
    for r in rows:
        if r["model"] != "mole-disk":
            continue
        speedup = fast.get((r["cache"], r["batch"]), float("nan"))
        line = (f"batch {r['batch']}, {r['cache']}: mole-disk = {r['ratio_to_dense']:.2f}x "
                f"dense ({'meets' if r['ratio_to_dense'] <= 1.1 else 'misses'} <= 1.1x), "
                f"{speedup:.1f}x faster than moe-offloaded "
                f"({'meets' if speedup >= 3 else 'misses'} >= 3x)")
        moe = speedup * r["ratio_to_dense"]
        if r["cache"] == "warm" and speedup < 3:
            # why, in numbers: mole-disk costs about what dense costs, so the 3x needs an
            # offloaded MoE at >= 3x dense; warm, its experts come from the page cache (RAM)
            line += (f". Warm, the offloaded experts come from the page cache, i.e. from RAM: "
                     f"offloading costs a copy and an fp16 -> fp32 conversion, and "
                     f"moe-offloaded runs at {moe:.2f}x dense, so 3x would need mole-disk "
                     f"at {moe / 3:.2f}x dense: faster than the dense model it contains (the "
                     f"same attention and shared FFN, plus a router and the table rows)")
        out.append(line)
    return out


def _moe_expert_bytes(s: dict) -> int:
    """fp16 bytes of every MoE expert: layers x experts x (W1 d x F/2 + W2 F/2 x d) x 2."""
    return s["n_layers"] * MOE_EXPERTS * 2 * s["d_model"] * (s["d_ff"] // 2) * 2


def results_section(rows: list[dict], command: str, size: str, prompt: int, steps: int,
                    rounds: int, load_before: str) -> str:
    s = SIZES[size]
    return "\n".join([
        START,
        "## MoLE decode latency: dense vs MoE (RAM / offloaded) vs MoLE (RAM / disk)",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today().isoformat()}, torch {torch.__version__}, CPU: "
        f"{cpu_name()} ({cpu_features()}), threads: {torch.get_num_threads()}, 1-minute load average before the "
        f"run: {load_before}.  ",
        f"Models (float32 compute, random weights): d={s['d_model']}, {s['n_layers']} layers, "
        f"{s['n_heads']} heads, vocab {s['vocab']}, untied, RMSNorm, non-gated GELU. dense: "
        f"FFN {s['d_ff']}; moe: {MOE_EXPERTS} experts of {s['d_ff'] // 2}, top-2; mole: shared "
        f"expert {s['d_ff']} + {MOLE_EXPERTS} routed experts of {s['d_ff']}, converted to an fp16 "
        f"table of {s['vocab'] * s['n_layers'] * MOLE_EXPERTS * s['d_model'] * 2 / 2**20:.0f} MB. "
        f"Offloaded MoE experts: fp16 file, "
        f"{_moe_expert_bytes(s) / 2**20:.0f} MB.  ",
        f"Prompt {prompt} random tokens, then {steps} greedy decode steps; median step time over "
        f"{rounds} rounds (first step of each run and a warm-up round dropped). Models decode in "
        "lockstep, the order rotated every step; three phases, each with its own dense "
        "reference: the in-RAM and `warm` rows together, then each `cold` row alone with dense. "
        "vs dense = median of per-step ratios to the dense step; `faster than moe-offloaded` = "
        "ratio of the two rows' vs-dense figures. ms / token = one decode step, i.e. one new token "
        "for each sequence of the batch. `cold` = the file's pages dropped (madvise + "
        "posix_fadvise DONTNEED) before every step, `warm` = page cache kept. moved / token = "
        "bytes read from the offloaded store per step / batch; disk reads = /proc/self/io "
        "read_bytes per step; resident = parameters + RAM tables (page cache not counted).",
        "",
        markdown_table(rows),
        "",
        *[f"- {v}" for v in verdicts(rows)],
        END,
    ])


def write_results(section: str, path: Path | None = None) -> Path:
    return write_section("mole_decode", section, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mole-decode", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--quick", action="store_true", help="tiny models, few steps (smoke test)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 256)")
    p.add_argument("--steps", type=int, default=None, help="decode steps per run (default 24)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 4)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--workdir", default=None,
                   help="keep the table and expert files here (reused by later runs)")
    p.add_argument("--write-results", action="store_true",
                   help="replace the mole_decode section of benchmarks/RESULTS.md")
    p.add_argument("--results-file", default=None, help="RESULTS.md path (default: repo's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = "quick" if args.quick else "default"
    prompt = args.prompt or (16 if args.quick else 256)
    steps = args.steps or (3 if args.quick else 24)
    rounds = args.rounds or (1 if args.quick else 4)
    load_before = load_average()
    rows = run_benchmark(size, tuple(args.batches), prompt, steps, rounds,
                         Path(args.workdir) if args.workdir else None)
    if args.json:
        print(json.dumps(rows))
    else:
        print(markdown_table(rows))
        print("\n".join(verdicts(rows)))
    if args.write_results:
        command = "python benchmarks/mole_decode.py " + " ".join(argv if argv is not None
                                                                 else sys.argv[1:])
        write_results(results_section(rows, command.strip(), size, prompt, steps, rounds,
                                      load_before), args.results_file)
    return 0

