"""Shared plumbing of the benchmarks: where `benchmarks/RESULTS.md` is, how one benchmark's
section of it is replaced without touching the others, and the machine facts every section
records (CPU, load average) so a figure can be read in context.

Each benchmark owns the text between `<!-- NAME:start -->` and `<!-- NAME:end -->`; writing is
atomic (temp file + rename), so an interrupted benchmark never leaves a half-written file.
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

from moelab.fsutil import write_text_atomic


def time_ms(fn, device=None) -> float:
    """Wall time of fn() in ms. On a CUDA device the queue is drained before and after, so the
    time covers the kernels and not only their launches."""
    cuda = device is not None and getattr(device, "type", str(device)).startswith("cuda")
    if cuda:
        import torch

        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) * 1e3


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def default_results_path() -> Path:
    """The checkout's benchmarks/RESULTS.md (src layout), else ./benchmarks/RESULTS.md."""
    repo_bench = Path(__file__).resolve().parents[2] / "benchmarks"
    bench_dir = repo_bench if repo_bench.is_dir() else Path.cwd() / "benchmarks"
    return bench_dir / "RESULTS.md"


def write_section(name: str, body: str, path: str | Path | None = None) -> Path:
    """Replace benchmark `name`'s marked section of RESULTS.md with `body` (or append it)."""
    path = Path(path) if path is not None else default_results_path()
    start, end = markers(name)
    body = body.strip()
    if body.startswith(start):  # a caller that already wrapped its body in the markers
        body = body[len(start):].rsplit(end, 1)[0].strip()
    section = f"{start}\n{body}\n{end}"
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    return path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> str:
    """The matrix-unit flags that decide CPU bf16 speed (AMX, AVX512-BF16), or 'none of ...'."""
    wanted = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f")
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    have = [f for f in wanted if f in flags]
    return ", ".join(have) if have else "none of " + ", ".join(wanted)


def load_average() -> str:
    """The 1-minute load average (other processes on the cores lower every timing)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "n/a"
