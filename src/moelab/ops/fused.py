"""The `scatter` backend of `expert_ffn`: per expert gather -> W1 -> act -> W2 in one
autograd.Function, with the k slot outputs of each token reduced by one `embedding_bag`.

Why this shape (measured on the 2-core CPU, 64 experts of 128, top-8, d=512, 8192 tokens, where
the (S, d) sorted tensors are 4x a dense layer's hidden activation, S = 8 T):
- Each expert gathers its own rows into a small buffer that stays in cache; no (S, d) gathered
  copy of x is ever made, in the forward or the backward.
- The router weights are applied by the reduction (`per_sample_weights`), at no extra pass; the
  backward scales the narrower of the (n, h) activation and the (n, d) gradient for dW2.
- Expert outputs land in sorted order straight from `torch.mm(out=)` into a reused scratch
  buffer; `F.embedding_bag(inverse_TK, Y_S, mode="sum")` then sums each token's k rows in one
  pass, accumulating in float32 even for bf16 and overwriting the output (no zero fill). A
  per-expert `index_add_` instead was 3-4x slower (it lowers to an unvectorised scatter_add) and
  rounds a bf16 sum k times.
- Saved for backward: the (S, h) pre-activation and activation, as autograd saves for a dense
  FFN of the same active width; gathered rows are re-gathered in the backward, never saved.
- Experts are split over worker threads (moelab/ops/parallel.py), and in bf16/fp16 every
  expert's rows are padded to a bucketed count (moelab/ops/layout.py) so that oneDNN compiles a
  handful of matmul kernels once instead of new ones at every routing decision. Padding rows
  gather token 0 and carry router weight 0, so they add nothing to any gradient.

Backward per expert e with rows r, x_e, h_e, a_e = act(h_e), router weights w_e, g_e = g[r]:
    u_e   = g_e W2_e^T;   dw_e = rowsum(u_e * a_e)   (router-weight grad, no expert output kept)
    dW2_e = (w_e a_e)^T g_e;   dh_e = act'(h_e) * (w_e u_e)
    dW1_e = x_e^T dh_e;        dX_S[e rows] = dh_e W1_e^T  -> dx = embedding_bag(dX_S)
Every dW slice is written into one preallocated (E, ., .) gradient with `torch.mm(out=)`, so no
expert pays for a zero-filled full-size gradient.
"""
from __future__ import annotations

import torch

from moelab.ops.activations import act_backward_into, act_forward_into
from moelab.ops.layout import layout_for, reduce_slots
from moelab.ops.parallel import run_experts
from moelab.ops.plan import RoutingPlan
from moelab.ops.workspace import scratch


class FusedExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_S, w1_EDH, w2_EHD, w3_EDH, plan: RoutingPlan, act: str):
        lay = layout_for(plan, x_TD)
        R, D, H = lay.n_rows, x_TD.shape[1], w1_EDH.shape[2]
        gated = w3_EDH is not None
        # Padding rows need weight 0 even for an unweighted combine: it zeroes their gradients
        # in the backward. (The forward never reads padding rows back.)
        w_R = lay.pairs_to_rows(w_S if w_S is not None or lay.pos_S is None
                                else torch.ones(plan.n_pairs, device=x_TD.device))
        # Saved for backward, as autograd would for a dense FFN: the pre-activation h and the
        # activation act(h) (recomputing act in the backward cost ~5% of a bf16 step), plus the
        # gate input u = x W3 when gated.
        h_RH, act_RH = x_TD.new_empty(R, H), x_TD.new_empty(R, H)
        u_RH = x_TD.new_empty(R, H) if gated else None
        y_RD = scratch(R, w2_EHD.shape[2], x_TD.dtype, x_TD.device)
        rows_R = lay.rows_R

        def experts(todo):
            # Per-expert working rows, reused by every expert of this range.
            C = max((n for _, _, n in todo), default=0)
            x_CD, a_CH = x_TD.new_empty(C, D), x_TD.new_empty(C, H) if gated else None
            for e, o, n in todo:
                x_nD = torch.index_select(x_TD, 0, rows_R[o:o + n], out=x_CD[:n])
                h_nH = torch.mm(x_nD, w1_EDH[e], out=h_RH[o:o + n])
                a_nH = act_forward_into(act, h_nH, act_RH[o:o + n])
                if gated:
                    a_nH = torch.mul(a_nH, torch.mm(x_nD, w3_EDH[e], out=u_RH[o:o + n]),
                                     out=a_CH[:n])
                torch.mm(a_nH, w2_EHD[e], out=y_RD[o:o + n])

        run_experts(experts, lay.counts, x_TD.device)
        ctx.save_for_backward(x_TD, w_S, w_R, w1_EDH, w2_EHD, w3_EDH, h_RH, act_RH, u_RH)
        ctx.plan, ctx.lay, ctx.act = plan, lay, act
        # the router weights are applied by the reduction itself (per_sample_weights): free
        w_TK = w_S.index_select(0, plan.inverse_S) if w_S is not None else None
        return reduce_slots(y_RD, lay.inverse_TK, w_TK)

    @staticmethod
    def backward(ctx, g_TD):
        x_TD, w_S, w_R, w1_EDH, w2_EHD, w3_EDH, h_RH, act_RH, u_RH = ctx.saved_tensors
        lay, act = ctx.lay, ctx.act
        need_x, need_w, need_w1, need_w2, need_w3 = ctx.needs_input_grad[:5]
        need_w = need_w and w_S is not None
        gated = u_RH is not None
        g_TD = g_TD.contiguous()
        D, H = x_TD.shape[1], h_RH.shape[1]
        dw_R = x_TD.new_empty(lay.n_rows, dtype=w_S.dtype) if need_w else None
        dw1 = torch.empty_like(w1_EDH) if need_w1 else None
        dw2 = torch.empty_like(w2_EHD) if need_w2 else None
        dw3 = torch.empty_like(w3_EDH) if need_w3 else None
        dx_RD = scratch(lay.n_rows, D, x_TD.dtype, x_TD.device) if need_x else None
        w_R1 = w_R.to(x_TD.dtype)[:, None] if w_R is not None else None
        rows_R = lay.rows_R
        for d in (dw1, dw2, dw3):  # experts that got no token have zero weight gradients
            if d is not None:
                for e in (e for e, n in enumerate(lay.counts) if n == 0):
                    d[e].zero_()

        def experts(todo):
            C = max((n for _, _, n in todo), default=0)
            new = x_TD.new_empty
            x_CD, g_CD, gw_CD = new(C, D), new(C, D), new(C, D) if D < H else None
            a_CH, ga_CH = new(C, H), new(C, H)
            gu_CH = new(C, H) if gated else None
            for e, o, n in todo:
                r = rows_R[o:o + n]
                g_nD = torch.index_select(g_TD, 0, r, out=g_CD[:n])
                h_nH, act_nH = h_RH[o:o + n], act_RH[o:o + n]
                if gated:
                    u_nH = u_RH[o:o + n]
                    a_nH = torch.mul(act_nH, u_nH, out=a_CH[:n])
                else:
                    a_nH = act_nH  # saved; only ever scaled out of place below
                ga_nH = torch.mm(g_nD, w2_EHD[e].t(), out=ga_CH[:n])  # d loss / d (w a)
                if w_R1 is not None:
                    if dw_R is not None:  # <g_t, a W2_e> = rowsum(ga * a), one fused pass
                        dw_R[o:o + n] = torch.linalg.vecdot(ga_nH, a_nH)
                    ga_nH.mul_(w_R1[o:o + n])
                if dw2 is None:
                    pass
                elif w_R1 is None:
                    torch.mm(a_nH.t(), g_nD, out=dw2[e])
                elif gw_CD is not None:  # dW2 = (w a)^T g = a^T (w g): scale the narrower
                    torch.mm(a_nH.t(), torch.mul(g_nD, w_R1[o:o + n], out=gw_CD[:n]),
                             out=dw2[e])
                else:
                    torch.mm(torch.mul(a_nH, w_R1[o:o + n], out=a_CH[:n]).t(), g_nD,
                             out=dw2[e])
                if not (need_x or need_w1 or need_w3):
                    continue
                if gated:
                    gu_nH = torch.mul(ga_nH, act_nH, out=gu_CH[:n])
                    ga_nH.mul_(u_nH)
                gh_nH = act_backward_into(act, ga_nH, h_nH, ga_nH)
                if need_w1 or need_w3:
                    x_nD = torch.index_select(x_TD, 0, r, out=x_CD[:n])
                    if dw1 is not None:
                        torch.mm(x_nD.t(), gh_nH, out=dw1[e])
                    if dw3 is not None:
                        torch.mm(x_nD.t(), gu_nH, out=dw3[e])
                if dx_RD is not None:
                    gx_nD = torch.mm(gh_nH, w1_EDH[e].t(), out=dx_RD[o:o + n])
                    if gated:
                        gx_nD.addmm_(gu_nH, w3_EDH[e].t())

        run_experts(experts, lay.counts, x_TD.device)
        dx = reduce_slots(dx_RD, lay.inverse_TK) if dx_RD is not None else None
        return dx, lay.rows_to_pairs(dw_R), dw1, dw2, dw3, None, None
