"""Expert-parallel execution on CPU: split the experts between worker threads.

With E small experts, intra-op threading splits every small op (a 1k-row gather, a 1k x 512 x
128 matmul) over the cores and joins them again: hundreds of fork/join barriers per step, each
one stalling whenever a core is busy elsewhere. Giving each core its own contiguous range of
experts, with one intra-op thread each, keeps the work per barrier at a whole expert range. The
ops release the GIL, so Python threads are enough.

`torch.set_num_threads` is process-wide, so it is set to 1 while the workers run and restored
afterwards; torch work launched concurrently from *other* Python threads during that window runs
single-threaded. `set_expert_threads(1)` turns this off. Calls made under a dispatch or function
mode (FlopCounterMode, fake tensors) or the profiler stay on the calling thread.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_override: int | None = None
MIN_PAIRS_PER_WORKER = 2048  # below this the thread hand-off costs more than it saves


def set_expert_threads(n: int | None) -> None:
    """Worker threads for expert-parallel kernels: None follows torch.get_num_threads()."""
    global _override
    _override = n


def _thread_local_state_active() -> bool:
    """Dispatch/function modes (FlopCounterMode, FakeTensorMode, ...) and the profiler are
    per-thread: work on a worker thread would escape them, so such calls run inline."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode
        return (_get_current_dispatch_mode() is not None
                or torch._C._is_torch_function_mode_enabled()
                or bool(torch.autograd.profiler._is_profiler_enabled))
    except (ImportError, AttributeError):  # private APIs moved: be safe, stay inline
        return True


def _workers(n_pairs: int, device: torch.device) -> int:
    if device.type != "cpu" or _thread_local_state_active():
        return 1
    n = _override if _override is not None else torch.get_num_threads()
    return max(1, min(n, n_pairs // MIN_PAIRS_PER_WORKER))


def split_experts(counts: Sequence[int], parts: int) -> list[list[tuple[int, int, int]]]:
    """Contiguous (expert, offset, count) ranges with about equal pair counts; empty experts
    are dropped (callers handle them)."""
    total = sum(counts)
    ranges: list[list[tuple[int, int, int]]] = [[] for _ in range(parts)]
    o = 0
    for e, n in enumerate(counts):
        if n:
            # the part whose share of the pairs this expert's midpoint falls in
            part = min(parts - 1, (2 * o + n) * parts // (2 * max(total, 1)))
            ranges[part].append((e, o, n))
        o += n
    return [r for r in ranges if r]


def run_experts(fn: Callable[[list[tuple[int, int, int]]], None], counts: Sequence[int],
                device: torch.device) -> None:
    """Call fn(expert_range) for every range, on worker threads when it pays off. fn must only
    write to rows/slices owned by its experts and must not rely on grad mode."""
    n_workers = _workers(sum(counts), device)
    if n_workers <= 1:
        fn(split_experts(counts, 1)[0] if sum(counts) else [])
        return
    ranges = split_experts(counts, n_workers)
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers < n_workers:  # noqa: SLF001
            _pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="moelab-exp")
        pool = _pool
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inference = torch.is_inference_mode_enabled()
        futures = [pool.submit(_no_grad_call, fn, r, inference) for r in ranges]
        for f in futures:
            f.result()
    finally:
        torch.set_num_threads(before)


def _no_grad_call(fn, r, inference: bool = False):
    # Grad and inference mode are thread-local: a worker must run in the caller's mode, or its
    # out= writes into buffers made under inference mode fail.
    with torch.inference_mode(inference), torch.no_grad():
        fn(r)
