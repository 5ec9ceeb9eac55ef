"""Backend names, validation and the automatic choice.

A backend is how the per-expert matmuls of a routed op are executed:

- `loop`: one gather of the sorted rows, then a sequential Python loop of `torch.mm` on
  contiguous slices; custom backward writing each dW slice into one preallocated gradient.
  Every dtype/device. The simple baseline (and, with reference.py, the correctness anchor).
- `scatter`: each expert gathers its own rows into a reused buffer (no (S, d) copy), experts are
  split over worker threads, 16-bit CPU matmuls run on bucketed row counts; for `expert_ffn` it
  is the fused gather -> W1 -> act -> W2 -> weighted-reduce kernel of fused.py. The fastest
  choice on CPU for training-sized batches.
- `grouped_mm`: `torch.nn.functional.grouped_mm` forward and backward (needs float32/bf16/fp16
  and rows whose byte stride is a multiple of 16; otherwise it falls back to `loop`).
- `padded`: rows scattered into an (E, C, d) zero-padded buffer (C = largest expert count) and
  one `torch.bmm`; one call instead of E, which wins for decode-sized batches.
- `triton`: the sorted-rows Triton kernels of triton_routed.py (forward, dx, dW), as
  `torch.library` custom ops. Needs CUDA tensors and the triton package, or CPU tensors under
  `TRITON_INTERPRET=1` (Triton's interpreter: how the tests run it without a GPU). float32,
  bf16 and fp16 (float32 accumulation); other dtypes fall back to `loop`. Not chosen by `auto`
  until it has been measured against `grouped_mm` on a GPU.
- `auto`: chosen per call by `choose_backend` from device, dtype and shape.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

from moelab.errors import ConfigError

BACKENDS = ("loop", "scatter", "grouped_mm", "padded", "triton")
CHOICES = ("auto",) + BACKENDS
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# CPU crossovers, measured with 2 threads (E=64, d=512, h=128, k=8 and E=8, h=1024, k=2; see
# docs/engine.md). Fewer pairs than experts (decode of a few tokens): the plain loop, which only
# touches the experts actually used, where `padded` reads every expert's weights. Up to
# PADDED_MAX_PAIRS_PER_EXPERT pairs per expert on average (and many experts): one padded bmm
# beats E small matmuls and their Python iterations. Otherwise the `scatter` kernels.
PADDED_MAX_PAIRS_PER_EXPERT = {torch.float32: 32, torch.bfloat16: 128, torch.float16: 128}
# With few experts the loop's per-expert overhead is small and `padded` gained nothing (E=8).
PADDED_MIN_EXPERTS = 16
# Inference (no gradient) at decode sizes, one thread (benchmarks/moe_decode.py, section
# moe_decode of benchmarks/RESULTS.md, idle machine): in float32 from 1 to 8 pairs per expert
# `grouped_mm` was the fastest plan-based backend in most rows (E 16-64, d 192-512), `padded`
# well behind it; in bf16 `padded` stayed ahead, as above. Below the gathered path's limits an
# ExpertBank skips the plan altogether (moelab/ops/gathered.py).
INFER_GROUPED_MAX_PAIRS_PER_EXPERT = 8
# Training in float32 with small per-expert matmuls (forward+backward of single routed matmuls
# and expert FFNs timed ad hoc on the idle 2-core machine, one thread; the effect on whole layers
# is benchmarks/attention_experts.py): `grouped_mm` beat `padded` at every count from 2 to 32
# pairs per expert, and beat `scatter` while one expert's matmul (pairs x d_in x d_out) stayed
# under about 6 M MACs, e.g. the UMoE paper's base attention experts (116 experts of 768 x 192,
# 26-35 pairs each) and umoe-att-tiny's bank (192 pairs of 192 x 48); at 8 M and above (128 pairs
# of 512 x 128, 512 pairs of 192 x 64) `scatter` led. On two threads `padded` (one
# multi-threaded bmm) led where routing was balanced.
TRAIN_GROUPED_MAX_EXPERT_MACS = 6_000_000  # moe-tiny's 256 x 192 x 128 = 6.3 M stays on scatter
# `padded` computes E x C rows (C = the largest expert's count), so unbalanced routing (a router
# that sends a few experts most tokens) multiplies its work. It is taken only while at most half
# of the padded rows are padding: a design bound, not a measured crossover.
PADDED_MAX_FILL = 2


def check_backend(name: str) -> str:
    if name not in CHOICES:
        raise ConfigError(f"moe_backend={name!r} is not a routed-experts backend; "
                          f"expected one of: {', '.join(CHOICES)}")
    return name


def triton_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on x: CUDA tensors, or CPU ones under Triton's
    interpreter, with the triton package importable."""
    if importlib.util.find_spec("triton") is None:
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and triton_interpreting()


def grouped_mm_supported(x: torch.Tensor, w_EIO: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` accepts these operands (probed on torch 2.13: float64 is refused,
    every row stride must be a multiple of 16 bytes; CUDA kernels want bf16 on sm80+)."""
    if not hasattr(torch.nn.functional, "grouped_mm"):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # torch 2.13's fake-tensor kernel accepts only bf16: compile cannot trace it
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or w_EIO.dtype != x.dtype:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 8:
            return False
    size = x.element_size()
    return (w_EIO.shape[1] * size) % 16 == 0 and (w_EIO.shape[2] * size) % 16 == 0


def choose_backend(x: torch.Tensor, w_EIO: torch.Tensor, n_pairs: int, n_experts: int,
                   max_count: int | None = None) -> str:
    """The automatic choice (see the constants above for the CPU measurements). On CUDA:
    `grouped_mm` where the kernel supports the operands, else `padded` for small batches and
    `loop` for large ones (untested here: the development machine has no GPU).

    `max_count`: the largest expert's pair count when the caller knows it without a device sync
    (a CPU plan's host counts); None is taken as balanced routing."""
    per_expert = n_pairs / max(n_experts, 1)
    small = per_expert <= PADDED_MAX_PAIRS_PER_EXPERT.get(x.dtype, 32)
    if x.device.type == "cuda":
        if grouped_mm_supported(x, w_EIO):
            return "grouped_mm"
        return "padded" if small else "loop"
    inference = not (torch.is_grad_enabled() and (x.requires_grad or w_EIO.requires_grad))
    if (inference and x.dtype == torch.float32
            and 1 <= per_expert <= INFER_GROUPED_MAX_PAIRS_PER_EXPERT
            and grouped_mm_supported(x, w_EIO)):
        return "grouped_mm"
    if per_expert < 1:
        return "loop"
    balanced = max_count is None or n_experts * max_count <= PADDED_MAX_FILL * n_pairs
    fp32 = x.dtype == torch.float32
    if (small and n_experts >= PADDED_MIN_EXPERTS and balanced
            and (torch.get_num_threads() > 1 or not fp32)):
        return "padded"
    if (fp32 and per_expert * w_EIO.shape[1] * w_EIO.shape[2] <= TRAIN_GROUPED_MAX_EXPERT_MACS
            and grouped_mm_supported(x, w_EIO)):
        return "grouped_mm"
    return "scatter"


def resolve_backend(name: str, x: torch.Tensor, w_EIO: torch.Tensor, n_pairs: int,
                    n_experts: int, max_count: int | None = None) -> str:
    """Validate `name` and turn `auto` (or an unusable explicit choice) into a concrete backend."""
    check_backend(name)
    if name == "auto":
        return choose_backend(x, w_EIO, n_pairs, n_experts, max_count)
    if name == "grouped_mm" and not grouped_mm_supported(x, w_EIO):
        return "loop"  # documented clean fallback: same math, every dtype and alignment
    if name == "triton":
        if not triton_usable(x):
            raise ConfigError("moe_backend='triton' needs CUDA tensors and the triton package "
                              "(or TRITON_INTERPRET=1 on CPU, for testing); use 'auto' (or "
                              "'grouped_mm'/'scatter') on this machine")
        if x.dtype not in TRITON_DTYPES or w_EIO.dtype != x.dtype:
            return "loop"  # documented fallback, as for grouped_mm: same math, every dtype
    return name


def amp_inputs(x: torch.Tensor, *ws: torch.Tensor | None):
    """Under autocast, cast x and the expert weights to the autocast dtype (what autocast does
    for a matmul) and return a context that disables autocast inside the engine, whose kernels
    use out= ops and worker threads that autocast cannot follow. Without autocast: unchanged.
    Either way the operands must then share one dtype."""
    dev = x.device.type
    ctx = contextlib.nullcontext()
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, ws = x.to(dt), tuple(None if w is None else w.to(dt) for w in ws)
        ctx = torch.autocast(dev, enabled=False)
    for w in ws:
        if w is not None and w.dtype != x.dtype:
            raise ValueError(f"expert weights are {w.dtype} but the input is {x.dtype}; cast "
                             "one of them (or run under torch.autocast)")
    return (x, *ws), ctx
