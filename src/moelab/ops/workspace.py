"""Reusable scratch buffers for the (S, d) sorted intermediates that live inside one op.

On CPU a fresh 64-128 MiB tensor is page-faulted in by the kernel on first touch: measured at
about 16 ms per 64 MiB on the 2-core benchmark machine, as much as the expert matmuls writing
into it. The engine's sorted outputs (expert outputs before the combine, input gradients before
their reduction) never escape the op that fills them, so each thread keeps one grow-only buffer
per (slot, dtype) and hands out views of it. Other devices have caching allocators: there the
scratch is a plain `torch.empty`.

The buffers stay allocated (the largest S*d seen per dtype); `release_workspace()` frees them.
"""
from __future__ import annotations

import threading

import torch

_local = threading.local()


def scratch(rows: int, cols: int, dtype: torch.dtype, device: torch.device,
            slot: str = "sorted") -> torch.Tensor:
    """An uninitialised (rows, cols) tensor that is valid until the next call for this slot.
    Callers must not return it or save it for backward."""
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    pool = _local.__dict__.setdefault("pool", {})
    need = rows * cols
    # A buffer made under inference mode is an inference tensor, which cannot be written outside
    # it (and vice versa for views): keep one pool per mode.
    key = (slot, dtype, torch.is_inference_mode_enabled())
    buf = pool.get(key)
    if buf is None or buf.numel() < need:
        buf = torch.empty(need, dtype=dtype)
        pool[key] = buf
    return buf[:need].view(rows, cols)


def release_workspace() -> None:
    """Free this thread's scratch buffers (they are re-created on demand)."""
    _local.__dict__.pop("pool", None)
