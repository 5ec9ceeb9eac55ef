"""`loop` and `scatter` backends of `routed_matmul`: per-expert `torch.mm` on sorted rows.

`loop` gathers all S rows once, then runs a sequential loop of `torch.mm` on contiguous slices:
the simplest fast path. `scatter` gathers each expert's rows into a reused buffer (no (S, I)
copy) and splits the experts over worker threads (parallel.py). Both, in bf16/fp16 on CPU, run
every matmul on a bucketed row count (layout.py) so oneDNN reuses its compiled kernels across
routing decisions (unbucketed, a bf16 step with fresh routing was 3-10x slower); the valid rows
are then copied into the tight (S, O) output.

Both backwards write each dW slice with `torch.mm(out=)` into one preallocated (E, I, O)
gradient: the naive autograd of `x_e @ w[e]` makes every `w[e]` select allocate and zero-fill a
full (E, I, O) gradient, measured at about 30% of a CPU training step.
"""
from __future__ import annotations

import torch

from moelab.ops.layout import layout_for, reduce_slots
from moelab.ops.parallel import run_experts
from moelab.ops.plan import RoutingPlan
from moelab.ops.workspace import scratch


def _work(plan: RoutingPlan, x: torch.Tensor, scatter: bool):
    """(bucketed layout or None, runner); the runner calls fn with a list of (expert, row
    offset, rows, tight offset, tight count), split over workers for `scatter`."""
    tight = list(zip(plan.offsets_host(), plan.counts()))
    lay = layout_for(plan, x)
    if lay.pos_S is None:
        counts = plan.counts()
        lay = None
    else:
        counts = lay.counts

    offsets, o = [], 0
    for n in counts:
        offsets.append(o)
        o += n

    def run(fn):
        def body(todo):
            fn([(e, o, n) + tight[e] for e, o, n in todo])
        if scatter:
            run_experts(body, counts, x.device)
        else:
            body([(e, o, n) for e, (o, n) in enumerate(zip(offsets, counts)) if n])
    return lay, run


def _expert_rows(x, src, rows, lay, x_CI, o, n, so, sn):
    """One expert's input rows: gathered from x by token index (scatter + gather), copied into
    a zero-padded bucket (bucketed layout), or a slice of the pair-sorted rows."""
    if rows is not None:
        return torch.index_select(x, 0, rows[o:o + n], out=x_CI[:n])
    if lay is not None:
        x_nI = x_CI[:n]
        x_nI[:sn].copy_(src[so:so + sn])
        return x_nI
    return src[so:so + sn]


class LoopRoutedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_EIO, plan: RoutingPlan, gather: bool, scatter: bool):
        lay, run = _work(plan, x, scatter)
        I, O = w_EIO.shape[1], w_EIO.shape[2]
        y_SO = x.new_empty(plan.n_pairs, O)
        src = x.index_select(0, plan.rows_S) if gather and not scatter else x
        rows = (lay.rows_R if lay is not None else plan.rows_S) if scatter and gather else None

        def experts(todo):
            C = max((n for _, _, n, _, _ in todo), default=0)
            # zero-initialised: rows past a bucket's valid count must hold finite values
            x_CI = x.new_zeros(C, I) if scatter or lay is not None else None
            y_CO = x.new_empty(C, O) if lay is not None else None
            for e, o, n, so, sn in todo:
                x_nI = _expert_rows(x, src, rows, lay, x_CI, o, n, so, sn)
                if y_CO is None:
                    torch.mm(x_nI, w_EIO[e], out=y_SO[so:so + sn])
                else:
                    y_SO[so:so + sn].copy_(torch.mm(x_nI, w_EIO[e], out=y_CO[:n])[:sn])

        run(experts)
        ctx.save_for_backward(x, w_EIO)
        ctx.plan, ctx.gather, ctx.scatter = plan, gather, scatter
        return y_SO

    @staticmethod
    def backward(ctx, g_SO):
        x, w_EIO = ctx.saved_tensors
        plan, gather, scatter = ctx.plan, ctx.gather, ctx.scatter
        lay, run = _work(plan, x, scatter)
        need_x, need_w = ctx.needs_input_grad[:2]
        g_SO = g_SO.contiguous()
        I, O = w_EIO.shape[1], w_EIO.shape[2]
        dx = dw = None
        if need_x:
            # gather: per-pair input grads go to scratch, then one float32-accumulating reduce
            dx = scratch(plan.n_pairs, I, x.dtype, x.device) if gather else torch.empty_like(x)
        if need_w:
            dw = torch.empty_like(w_EIO)
            for e, n in enumerate(plan.counts()):
                if n == 0:
                    dw[e].zero_()
        src = x.index_select(0, plan.rows_S) if need_w and gather and not scatter else x
        rows = (lay.rows_R if lay is not None else plan.rows_S) if scatter and gather else None

        def experts(todo):
            C = max((n for _, _, n, _, _ in todo), default=0)
            x_CI = x.new_zeros(C, I) if need_w and (scatter or lay is not None) else None
            g_CO = x.new_zeros(C, O) if lay is not None else None
            dx_CI = x.new_empty(C, I) if lay is not None and need_x else None
            for e, o, n, so, sn in todo:
                if g_CO is not None:  # bucketed: valid rows, then zeros (no dW contribution)
                    g_nO = g_CO[:n]
                    g_nO[:sn].copy_(g_SO[so:so + sn])
                    g_nO[sn:].zero_()
                else:
                    g_nO = g_SO[so:so + sn]
                if dw is not None:
                    x_nI = _expert_rows(x, src, rows, lay, x_CI, o, n, so, sn)
                    torch.mm(x_nI.t(), g_nO, out=dw[e])
                if dx is not None:
                    if dx_CI is None:
                        torch.mm(g_nO, w_EIO[e].t(), out=dx[so:so + sn])
                    else:
                        dx[so:so + sn].copy_(torch.mm(g_nO, w_EIO[e].t(), out=dx_CI[:n])[:sn])

        run(experts)
        if dx is not None and gather:
            dx = reduce_slots(dx, plan.inverse_TK)
        return dx, dw, None, None, None
