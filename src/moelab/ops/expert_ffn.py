"""`expert_ffn`: E two-layer experts applied to routed tokens, sharing one plan for both matmuls."""
from __future__ import annotations

import torch

from moelab.ops.activations import act_forward, check_activation
from moelab.ops.backends import amp_inputs, resolve_backend
from moelab.ops.fused import FusedExpertFFN
from moelab.ops.plan import RoutingPlan
from moelab.ops.routed import combine, routed_matmul


def _check(x_TD, w1_EDH, w2_EHD, w3_EDH, plan):
    E, D, H = w1_EDH.shape
    if E != plan.n_experts or tuple(w2_EHD.shape) != (E, H, D):
        raise ValueError(f"expert weights must be w1 (E, d, h) and w2 (E, h, d) with "
                         f"E={plan.n_experts}; got {tuple(w1_EDH.shape)}, {tuple(w2_EHD.shape)}")
    if w3_EDH is not None and w3_EDH.shape != w1_EDH.shape:
        raise ValueError(f"w3 must match w1 {tuple(w1_EDH.shape)}, got {tuple(w3_EDH.shape)}")
    if x_TD.dim() != 2 or x_TD.shape != (plan.n_tokens, D):
        raise ValueError(f"x must be (T={plan.n_tokens}, d={D}), got {tuple(x_TD.shape)}")


def expert_hidden_sorted(x_TD, w1_EDH, plan, activation, w3_EDH=None, backend="auto"):
    """act(x W1) [* (x W3)] for every routed pair, (S, h) in sorted order (unfused paths)."""
    h_SH = act_forward(activation, routed_matmul(x_TD, w1_EDH, plan, gather=True,
                                                 backend=backend))
    if w3_EDH is not None:
        h_SH = h_SH * routed_matmul(x_TD, w3_EDH, plan, gather=True, backend=backend)
    return h_SH


def expert_ffn_sorted(x_TD, w1_EDH, w2_EHD, plan, activation="silu", w3_EDH=None,
                      backend="auto") -> torch.Tensor:
    """Per-pair expert outputs (S, d) in sorted order, not combined (for per-slot consumers)."""
    check_activation(activation)
    _check(x_TD, w1_EDH, w2_EHD, w3_EDH, plan)
    (x_TD, w1_EDH, w2_EHD, w3_EDH), amp = amp_inputs(x_TD, w1_EDH, w2_EHD, w3_EDH)
    with amp:
        h_SH = expert_hidden_sorted(x_TD, w1_EDH, plan, activation, w3_EDH, backend)
        return routed_matmul(h_SH, w2_EHD, plan, gather=False, backend=backend)


def expert_ffn(x_TD: torch.Tensor, w1_EDH: torch.Tensor, w2_EHD: torch.Tensor,
               plan: RoutingPlan, weights_TK: torch.Tensor | None = None,
               activation: str = "silu", w3_EDH: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """y_t = sum_j w_{t,j} FFN_{e_{t,j}}(x_t), (T, d).

    FFN_e(x) = act(x W1_e) W2_e, or act(x W1_e) * (x W3_e) W2_e when `w3_EDH` is given (gated).
    Router weights are cast to x's dtype for the products; their gradient flows back in the
    weights' own dtype. `backend="scatter"` (the CPU default) runs the fused kernel of
    moelab/ops/fused.py; the other backends compose `routed_matmul` + activation + `combine`.
    """
    check_activation(activation)
    _check(x_TD, w1_EDH, w2_EHD, w3_EDH, plan)
    (x_TD, w1_EDH, w2_EHD, w3_EDH), amp = amp_inputs(x_TD, w1_EDH, w2_EHD, w3_EDH)
    name = resolve_backend(backend, x_TD, w1_EDH, plan.n_pairs, plan.n_experts,
                           plan.host_max_count())
    with amp:
        if name == "scatter":
            w_S = None
            if weights_TK is not None:  # kept in the router's dtype; its grad comes back so
                w_S = plan.sort_pairs(weights_TK.reshape(plan.n_tokens, plan.top_k))
            return FusedExpertFFN.apply(x_TD, w_S, w1_EDH, w2_EHD, w3_EDH, plan, activation)
        h_SH = expert_hidden_sorted(x_TD, w1_EDH, plan, activation, w3_EDH, name)
        y_SD = routed_matmul(h_SH, w2_EHD, plan, gather=False, backend=name)
        return combine(y_SD, plan, weights_TK)
