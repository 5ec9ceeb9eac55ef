"""Routed matmul `y_S = x[rows] @ W[expert]` and the weighted `combine` back to tokens.

Shapes: x is (T, I) token-major when `gather=True`, or (S, I) already in sorted pair order when
`gather=False` (the second matmul of an expert); W is (E, I, O); y is (S, O) in sorted order.

`loop`/`scatter` live in loop.py, `triton` in triton_routed.py; `grouped_mm` and `padded` here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.ops.backends import amp_inputs, resolve_backend
from moelab.ops.layout import bucketing_pays, reduce_slots
from moelab.ops.loop import LoopRoutedMM
from moelab.ops.plan import RoutingPlan, bucket_rows


def _register_grouped_mm_flops() -> None:
    """Teach `torch.utils.flop_counter.FlopCounterMode` grouped_mm's FLOPs, which torch 2.13
    counts as zero (the FLOP tables and `moelab.flops` checks would miss every expert matmul
    that `auto` sends to `grouped_mm`). Skipped where torch has a formula of its own."""
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_grouped_mm", None)
    if op is None or op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        if len(a_shape) == 2 and len(b_shape) == 2:  # (I, S) x (S, O) -> (E, I, O): dW
            return 2 * a_shape[0] * a_shape[1] * b_shape[1]
        n_out = 1
        for s in out_shape:  # every output element is a dot product of length K
            n_out *= s
        return 2 * n_out * a_shape[-1]


_register_grouped_mm_flops()


class GroupedRoutedMM(torch.autograd.Function):
    """`grouped_mm`: one grouped GEMM per pass (forward, dx, dW) over the sorted rows."""

    @staticmethod
    def forward(ctx, x, w_EIO, plan: RoutingPlan, gather: bool):
        x_SI = x.index_select(0, plan.rows_S) if gather else x.contiguous()
        offs = plan.offsets_i32()
        y_SO = F.grouped_mm(x_SI, w_EIO, offs=offs)
        ctx.save_for_backward(x_SI, w_EIO)  # dW needs the sorted rows; keep the one gather
        ctx.plan, ctx.gather, ctx.n_rows = plan, gather, x.shape[0]
        return y_SO

    @staticmethod
    def backward(ctx, g_SO):
        x_SI, w_EIO = ctx.saved_tensors
        plan = ctx.plan
        offs = plan.offsets_i32()
        g_SO = g_SO.contiguous()  # grouped_mm rejects the stride-0 grads of e.g. .sum()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx_SI = F.grouped_mm(g_SO, w_EIO.transpose(1, 2), offs=offs)
            dx = reduce_slots(dx_SI, plan.inverse_TK) if ctx.gather else dx_SI
        if ctx.needs_input_grad[1]:
            dw = F.grouped_mm(x_SI.t(), g_SO, offs=offs)  # empty groups come back as zeros
        return dx, dw, None, None


def _padded_dest(plan: RoutingPlan, capacity: int) -> torch.Tensor:
    """Row of each sorted pair in the flattened (E * C) padded buffer: expert * C + rank."""
    cache = plan.__dict__.setdefault("_padded_cache", {})
    if capacity not in cache:
        rank_S = torch.arange(plan.n_pairs, device=plan.device) - plan.offsets_E1[plan.expert_S]
        cache[capacity] = plan.expert_S * capacity + rank_S
    return cache[capacity]


def padded_routed_mm(x, w_EIO, plan: RoutingPlan, gather: bool) -> torch.Tensor:
    """`padded`: scatter rows into (E, C, I) zeros, one bmm, read the valid rows back. Plain
    autograd suffices: bmm's backward already produces the stacked dW without per-expert fills."""
    E, I, O = w_EIO.shape
    C = max(plan.max_count(), 1)
    if bucketing_pays(x):
        C = bucket_rows(C)  # a stable bmm shape: oneDNN compiles one kernel per shape
    dest_S = _padded_dest(plan, C)
    x_SI = x.index_select(0, plan.rows_S) if gather else x
    x_ECI = x.new_zeros(E * C, I).index_copy(0, dest_S, x_SI).view(E, C, I)
    y_ECO = torch.bmm(x_ECI, w_EIO)
    return y_ECO.view(E * C, O).index_select(0, dest_S)


def routed_matmul(x: torch.Tensor, w_EIO: torch.Tensor, plan: RoutingPlan, *, gather: bool,
                  backend: str = "auto") -> torch.Tensor:
    """y_S = x[rows] @ W[expert] in sorted pair order, (S, O). See the module docstring."""
    if w_EIO.dim() != 3 or w_EIO.shape[0] != plan.n_experts:
        raise ValueError(f"expert weight must be (E={plan.n_experts}, d_in, d_out), "
                         f"got {tuple(w_EIO.shape)}")
    want = plan.n_tokens if gather else plan.n_pairs
    if x.dim() != 2 or x.shape[0] != want or x.shape[1] != w_EIO.shape[1]:
        raise ValueError(f"x must be ({want}, {w_EIO.shape[1]}) with gather={gather}, "
                         f"got {tuple(x.shape)}")
    (x, w_EIO), amp = amp_inputs(x, w_EIO)
    name = resolve_backend(backend, x, w_EIO, plan.n_pairs, plan.n_experts, plan.host_max_count())
    with amp:
        if name == "grouped_mm":
            return GroupedRoutedMM.apply(x, w_EIO, plan, gather)
        if name == "padded":
            return padded_routed_mm(x, w_EIO, plan, gather)
        if name == "triton":
            from moelab.ops.triton_routed import triton_routed_mm  # imports triton

            return triton_routed_mm(x, w_EIO, plan, gather)
        return LoopRoutedMM.apply(x, w_EIO, plan, gather, name == "scatter")


class Combine(torch.autograd.Function):
    """out_t = sum_j w_{t,j} y_{pair(t,j)}: one `embedding_bag` over the sorted rows (a fused
    gather-and-weighted-sum that accumulates in float32 and needs no zero-filled output)."""

    @staticmethod
    def forward(ctx, y_SO, w_S, plan: RoutingPlan):
        ctx.save_for_backward(y_SO, w_S)
        ctx.plan = plan
        # per-sample weights in bag (token) order
        w_TK = w_S.index_select(0, plan.inverse_S) if w_S is not None else None
        return reduce_slots(y_SO, plan.inverse_TK, w_TK)

    @staticmethod
    def backward(ctx, g_TO):
        y_SO, w_S = ctx.saved_tensors
        plan = ctx.plan
        g_SO = g_TO.index_select(0, plan.rows_S)
        dw = None
        if w_S is not None and ctx.needs_input_grad[1]:
            dw = torch.linalg.vecdot(g_SO, y_SO).to(w_S.dtype)  # row-wise <g, y>, one pass
        if w_S is not None:
            g_SO.mul_(w_S.to(g_SO.dtype)[:, None])  # same dtype: a mixed in-place mul copies
        return g_SO, dw, None


def combine(y_SO: torch.Tensor, plan: RoutingPlan,
            weights_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Scatter sorted slot outputs back to tokens, (T, O), weighted by `weights_TK` if given.
    Gradients flow to `y_SO` and to `weights_TK` (in the weights' own dtype)."""
    if y_SO.shape[0] != plan.n_pairs:
        raise ValueError(f"y must have S={plan.n_pairs} sorted rows, got {y_SO.shape[0]}")
    w_S = None
    if weights_TK is not None:
        w_S = plan.sort_pairs(weights_TK.reshape(plan.n_tokens, plan.top_k))
    return Combine.apply(y_SO, w_S, plan)
