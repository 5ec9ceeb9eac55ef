"""Plain-autograd reference implementations: the correctness oracle for every backend.

Deliberately naive (a Python loop over experts indexing `w[e]`, `torch.cat`, `index_add`) so
that they are obviously right; they are also the "reference" row of the benchmark, showing what
the engine's custom backwards save.
"""
from __future__ import annotations

import torch

from moelab.ops.activations import act_forward
from moelab.ops.plan import RoutingPlan


def reference_routed_matmul(x, w_EIO, plan: RoutingPlan, *, gather: bool) -> torch.Tensor:
    # split (not slicing) so the backward is one cat, not a zero-filled (S, I) grad per expert;
    # `w_EIO[e]` stays naive on purpose: its backward zero-fills a full (E, I, O) per expert.
    x_SI = x[plan.rows_S] if gather else x
    parts = x_SI.split(plan.counts_E.tolist(), 0)
    return torch.cat([x_nI @ w_EIO[e] for e, x_nI in enumerate(parts)], 0)


def reference_combine(y_SO, plan: RoutingPlan, weights_TK=None) -> torch.Tensor:
    if weights_TK is not None:
        w_S = weights_TK.reshape(-1)[plan.order_S].to(y_SO.dtype)
        y_SO = y_SO * w_S[:, None]
    out = y_SO.new_zeros(plan.n_tokens, y_SO.shape[1])
    return out.index_add(0, plan.rows_S, y_SO)


def reference_expert_ffn(x_TD, w1_EDH, w2_EHD, plan: RoutingPlan, weights_TK=None,
                         activation: str = "silu", w3_EDH=None) -> torch.Tensor:
    h_SH = act_forward(activation, reference_routed_matmul(x_TD, w1_EDH, plan, gather=True))
    if w3_EDH is not None:
        h_SH = h_SH * reference_routed_matmul(x_TD, w3_EDH, plan, gather=True)
    y_SD = reference_routed_matmul(h_SH, w2_EHD, plan, gather=False)
    return reference_combine(y_SD, plan, weights_TK)


def per_token_expert_ffn(x_TD, w1_EDH, w2_EHD, expert_idx_TK, weights_TK=None,
                         activation: str = "silu", w3_EDH=None) -> torch.Tensor:
    """sum_j w_j FFN_{e_j}(x_t), token by token: the definition, independent of any plan."""
    rows = []
    for t in range(x_TD.shape[0]):
        acc = x_TD.new_zeros(w2_EHD.shape[2])
        for j in range(expert_idx_TK.shape[1]):
            e = int(expert_idx_TK[t, j])
            h = act_forward(activation, x_TD[t] @ w1_EDH[e])
            if w3_EDH is not None:
                h = h * (x_TD[t] @ w3_EDH[e])
            y = h @ w2_EHD[e]
            acc = acc + (y if weights_TK is None else weights_TK[t, j].to(y.dtype) * y)
        rows.append(acc)
    return torch.stack(rows)
