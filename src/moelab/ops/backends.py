"""Backend names, validation and the automatic choice.

A backend is how the per-expert matmuls of a routed op are executed:

- `loop`: Python loop over experts, `torch.mm` on contiguous slices of the sorted rows, custom
  backward writing each dW slice into one preallocated gradient. Works for every dtype/device.
- `scatter`: like `loop` but each expert gathers its own token rows (no (S, d) gathered copy);
  for `expert_ffn` it is the fully fused gather -> W1 -> act -> W2 -> weighted scatter-add kernel
  (moelab/ops/fused.py). The fastest choice on CPU for training-sized batches.
- `grouped_mm`: `torch.nn.functional.grouped_mm` forward and backward (needs float32/bf16/fp16
  and rows whose byte stride is a multiple of 16; otherwise it falls back to `loop`).
- `padded`: experts' rows scattered into an (E, C, d) zero-padded buffer (C = largest expert
  count) and one `torch.bmm`; one call instead of E, which wins when batches are decode-sized.
- `triton`: reserved for a CUDA kernel; needs CUDA tensors and an importable triton.
- `auto`: chosen per call by `choose_backend` from device, dtype and shape.
"""
from __future__ import annotations

import importlib.util

import torch

from moelab.errors import ConfigError

BACKENDS = ("loop", "scatter", "grouped_mm", "padded", "triton")
CHOICES = ("auto",) + BACKENDS

# Below this many routed pairs per expert (on average) one padded bmm beats E small matmuls plus
# E Python iterations on CPU (measured: E=64, d=512, h=128; the crossover is near 4 pairs/expert).
PADDED_MAX_PAIRS_PER_EXPERT = 4


def check_backend(name: str) -> str:
    if name not in CHOICES:
        raise ConfigError(f"moe_backend={name!r} is not a routed-experts backend; "
                          f"expected one of: {', '.join(CHOICES)}")
    return name


def triton_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def grouped_mm_supported(x: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` accepts these operands (probed on torch 2.13: float64 is refused,
    every row stride must be a multiple of 16 bytes; CUDA kernels want bf16 on sm80+)."""
    if not hasattr(torch.nn.functional, "grouped_mm"):
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or w_EIO.dtype != x.dtype:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 8:
            return False
    size = x.element_size()
    return (w_EIO.shape[1] * size) % 16 == 0 and (w_EIO.shape[2] * size) % 16 == 0


def choose_backend(x: torch.Tensor, w_EIO: torch.Tensor, n_pairs: int, n_experts: int) -> str:
    """The automatic choice. Measured on CPU (benchmarks/RESULTS.md): `scatter` for training
    batches in float32 and bf16, `padded` when there are only a few pairs per expert (decode).
    On CUDA: `grouped_mm` where the kernel supports the operands, otherwise `padded` for small
    batches and `loop` for large ones."""
    small = n_pairs <= PADDED_MAX_PAIRS_PER_EXPERT * n_experts
    if x.device.type == "cuda":
        if grouped_mm_supported(x, w_EIO):
            return "grouped_mm"
        return "padded" if small else "loop"
    return "padded" if small else "scatter"


def resolve_backend(name: str, x: torch.Tensor, w_EIO: torch.Tensor, n_pairs: int,
                    n_experts: int) -> str:
    """Validate `name` and turn `auto` (or an unusable explicit choice) into a concrete backend."""
    check_backend(name)
    if name == "auto":
        return choose_backend(x, w_EIO, n_pairs, n_experts)
    if name == "grouped_mm" and not grouped_mm_supported(x, w_EIO):
        return "loop"  # documented clean fallback: same math, every dtype and alignment
    if name == "triton":
        if not triton_available() or x.device.type != "cuda":
            raise ConfigError("moe_backend='triton' needs CUDA tensors and the triton package; "
                              "use 'auto' (or 'grouped_mm'/'scatter') on this machine")
        raise NotImplementedError("moe_backend='triton': no Triton kernel ships in this version "
                                  "of moelab; use 'grouped_mm' on CUDA")
    return name
