"""Large CPU blocks kept for reuse between training steps (glibc malloc settings).

glibc's malloc serves every block above its mmap threshold (adaptive, at most 32 MiB) with a
fresh `mmap` and unmaps it on free. A training step frees and reallocates the same large tensors
every time: the gradient of an expert bank (the UMoE paper's base attention experts: 116 x 768 x
192 float32 = 68 MiB per weight), saved activations, padded buffers. Each fresh mapping is
zero-filled by the kernel page by page on first touch, one page fault per 4 KiB, every step.
`tests/test_cpu_memory.py` counts those faults with and without the setting;
`benchmarks/attention_experts.py --cpu-allocator system` measures what they cost a layer.

`reuse_large_blocks()` raises the mmap threshold to `LARGE_BLOCK_BYTES` and the trim threshold
with it, so such blocks come from malloc's heap and stay mapped after a free, ready for the next
step. The price is resident memory: memory freed by the process is kept (up to its high-water
mark) instead of being returned to the system, as with jemalloc or tcmalloc, which PyTorch's CPU
performance guides suggest for the same reason. `moelab train` applies it on CPU unless
`train.cpu_allocator: system`. It changes the whole process, so a library call never applies it
on its own.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

LARGE_BLOCK_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap
CPU_ALLOCATORS = ("reuse", "system")  # the choices of train.cpu_allocator
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_large_blocks(limit: int = LARGE_BLOCK_BYTES) -> bool:
    """Keep freed blocks of up to `limit` bytes mapped for reuse (see the module docstring).

    Returns whether it took effect: True on Linux with glibc, False elsewhere (other C
    libraries, macOS, Windows), where nothing is changed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, int(limit)) == 1
    # trim only above twice that (an int: at most 2 GiB - 1)
    return mallopt(_M_TRIM_THRESHOLD, min(2 * int(limit), 2**31 - 1)) == 1 and ok


def use_cpu_allocator(name: str) -> bool:
    """Apply a `train.cpu_allocator` choice: "reuse" calls `reuse_large_blocks`, "system"
    changes nothing. Returns whether malloc was changed."""
    if name not in CPU_ALLOCATORS:
        raise ValueError(f"cpu allocator {name!r}: expected one of {CPU_ALLOCATORS}")
    return name == "reuse" and reuse_large_blocks()
