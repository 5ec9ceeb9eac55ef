"""Routed matmul `y_S = x[rows] @ W[expert]` and the weighted `combine` back to tokens.

Shapes: x is (T, I) token-major when `gather=True`, or (S, I) already in sorted pair order when
`gather=False` (the second matmul of an expert); W is (E, I, O); y is (S, O) in sorted order.

Each backend is one autograd.Function with its own backward, because the naive autograd of a
per-expert loop (`x_e @ w[e]`) makes every `w[e]` select allocate and zero-fill a full (E, I, O)
gradient in the backward: measured at about 30% of a CPU training step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.ops.backends import resolve_backend
from moelab.ops.fused import accumulate_dtype
from moelab.ops.plan import RoutingPlan

_COMBINE_CHUNK = 4096  # rows per scatter-add chunk: keeps the weighted temporary in L2


class LoopRoutedMM(torch.autograd.Function):
    """`loop` (gathers all S rows once) and `scatter` (each expert gathers its own rows)."""

    @staticmethod
    def forward(ctx, x, w_EIO, plan: RoutingPlan, gather: bool, per_expert_gather: bool):
        rows_S = plan.rows_S
        y_SO = x.new_empty(plan.n_pairs, w_EIO.shape[2])
        src = x.index_select(0, rows_S) if gather and not per_expert_gather else x
        o = 0
        for e, n in enumerate(plan.counts()):
            if n:
                x_nI = src.index_select(0, rows_S[o:o + n]) if src is x and gather \
                    else src[o:o + n]
                torch.mm(x_nI, w_EIO[e], out=y_SO[o:o + n])
            o += n
        ctx.save_for_backward(x, w_EIO)
        ctx.plan, ctx.gather, ctx.per_expert = plan, gather, per_expert_gather
        return y_SO

    @staticmethod
    def backward(ctx, g_SO):
        x, w_EIO = ctx.saved_tensors
        plan, gather = ctx.plan, ctx.gather
        need_x, need_w = ctx.needs_input_grad[:2]
        g_SO = g_SO.contiguous()
        rows_S = plan.rows_S
        dx = dw = None
        if need_x:
            # Gathered inputs get k contributions per token: accumulate them in float32 for 16-bit.
            dx = (torch.zeros(x.shape, dtype=accumulate_dtype(x.dtype), device=x.device)
                  if gather else torch.empty_like(x))
        if need_w:
            dw = torch.empty_like(w_EIO)
        src = x
        if need_w and gather and not ctx.per_expert:
            src = x.index_select(0, rows_S)
        o = 0
        for e, n in enumerate(plan.counts()):
            if n == 0:
                if dw is not None:
                    dw[e].zero_()
                continue
            g_nO = g_SO[o:o + n]
            if dw is not None:
                x_nI = src.index_select(0, rows_S[o:o + n]) if src is x and gather \
                    else src[o:o + n]
                torch.mm(x_nI.t(), g_nO, out=dw[e])
            if dx is not None:
                if gather:
                    gx_nI = torch.mm(g_nO, w_EIO[e].t())
                    dx.index_add_(0, rows_S[o:o + n], gx_nI.to(dx.dtype))
                else:
                    torch.mm(g_nO, w_EIO[e].t(), out=dx[o:o + n])
            o += n
        if dx is not None and dx.dtype != x.dtype:
            dx = dx.to(x.dtype)
        return dx, dw, None, None, None


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
            if ctx.gather:
                acc = accumulate_dtype(dx_SI.dtype)
                dx = torch.zeros(ctx.n_rows, dx_SI.shape[1], dtype=acc, device=dx_SI.device)
                dx = dx.index_add_(0, plan.rows_S, dx_SI.to(acc)).to(dx_SI.dtype)
            else:
                dx = dx_SI
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
    name = resolve_backend(backend, x, w_EIO, plan.n_pairs, plan.n_experts)
    if name == "grouped_mm":
        return GroupedRoutedMM.apply(x, w_EIO, plan, gather)
    if name == "padded":
        return padded_routed_mm(x, w_EIO, plan, gather)
    return LoopRoutedMM.apply(x, w_EIO, plan, gather, name == "scatter")


class Combine(torch.autograd.Function):
    """out_T = sum_j w_{t,j} y_{pair(t,j)}: a chunked weighted scatter-add over sorted pairs."""

    @staticmethod
    def forward(ctx, y_SO, w_S, plan: RoutingPlan):
        acc = accumulate_dtype(y_SO.dtype)
        out_TO = torch.zeros(plan.n_tokens, y_SO.shape[1], dtype=acc, device=y_SO.device)
        rows_S = plan.rows_S
        for o in range(0, plan.n_pairs, _COMBINE_CHUNK):
            y_cO = y_SO[o:o + _COMBINE_CHUNK].to(acc)
            if w_S is not None:
                y_cO = y_cO * w_S[o:o + _COMBINE_CHUNK, None].to(acc)
            out_TO.index_add_(0, rows_S[o:o + _COMBINE_CHUNK], y_cO)
        ctx.save_for_backward(y_SO, w_S)
        ctx.plan = plan
        return out_TO.to(y_SO.dtype)

    @staticmethod
    def backward(ctx, g_TO):
        y_SO, w_S = ctx.saved_tensors
        plan = ctx.plan
        g_SO = g_TO.index_select(0, plan.rows_S)
        dw = None
        if w_S is not None and ctx.needs_input_grad[1]:
            # Row-wise <g, y> as a batched (1,O)@(O,1) matmul: no (S, O) product temporary.
            dw = torch.bmm(g_SO.unsqueeze(1), y_SO.unsqueeze(2)).view(-1).to(w_S.dtype)
        if w_S is not None:
            g_SO.mul_(w_S[:, None].to(g_SO.dtype))
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
