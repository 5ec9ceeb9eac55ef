"""The decode path of the routed-experts engine: per-pair expert weights gathered, one bmm.

A decode step routes a handful of tokens: at batch 1 and 8 of the tiny MoE presets there are
no more (token, slot) pairs than experts. There the plan-based backends pay for their fixed
cost (the sort of `build_plan`, host counts, a Python loop or a padded buffer over every
expert) more than for the arithmetic. Here every pair instead gathers its own expert's matrices,
W1[e_p] (S, d, h), and one batched matmul per layer runs them all:

    h_S1H = act(x_S1D @ W1[e_S]) [* (x_S1D @ W3[e_S])],  y_TD = sum_j w_tj (h @ W2[e])_tj

No plan is built. The copy reads each used expert once per pair, so `use_gathered` allows it
only while the pairs are few and the copy small enough to stay in cache (measured at decode
sizes, see docs/engine.md). Inference only in `auto` (plain autograd would scatter the weight
gradient into a full (E, d, h) zero tensor per call).
"""
from __future__ import annotations

import torch

from moelab.ops.activations import act_forward
from moelab.ops.workspace import scratch

# Measured with one thread at decode sizes (benchmarks/moe_decode.py, section moe_decode of
# benchmarks/RESULTS.md, idle machine): up to one pair per expert in float32 and two in
# bf16, with the copy under 8 MiB, the gathered bmm was the fastest or level with it in most
# rows; beyond that (more pairs, or d=512 experts at batch 8) it fell far behind.
GATHERED_MAX_PAIRS_PER_EXPERT = {torch.float32: 1.0, torch.bfloat16: 2.0, torch.float16: 2.0}
GATHERED_MAX_BYTES = 8 << 20


def use_gathered(x: torch.Tensor, n_pairs: int, n_experts: int, *weights) -> bool:
    """Whether `auto` takes the decode path: CPU, no gradient wanted, few pairs, small copy."""
    ws = [w for w in weights if w is not None]
    if x.device.type != "cpu" or any(w.dtype != x.dtype for w in ws):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in ws)):
        return False
    limit = GATHERED_MAX_PAIRS_PER_EXPERT.get(x.dtype)
    if limit is None or n_pairs > limit * n_experts:
        return False
    per_pair = sum(w[0].numel() for w in ws) * x.element_size()
    return n_pairs * per_pair <= GATHERED_MAX_BYTES


def _gather(w_EIO: torch.Tensor, e_S: torch.Tensor, slot: str) -> torch.Tensor:
    """w[e_S], (S, I, O). Outside autograd into a reused scratch buffer: a fresh multi-MiB
    tensor per call is page-faulted in again every time (moelab/ops/workspace.py), which made
    the same call range from 2 to 6 ms under load at batch 8 of moe-tiny."""
    if torch.is_grad_enabled() and w_EIO.requires_grad:
        return w_EIO.index_select(0, e_S)
    E, I, O = w_EIO.shape
    buf = scratch(e_S.numel(), I * O, w_EIO.dtype, w_EIO.device, slot).view(-1, I, O)
    return torch.index_select(w_EIO, 0, e_S, out=buf)


def gathered_expert_ffn(x_TD: torch.Tensor, w1_EDH: torch.Tensor, w2_EHD: torch.Tensor,
                        expert_idx_TK: torch.Tensor, weights_TK: torch.Tensor | None = None,
                        activation: str = "silu",
                        w3_EDH: torch.Tensor | None = None) -> torch.Tensor:
    """y_t = sum_j w_{t,j} FFN_{e_{t,j}}(x_t), (T, d), from the (T, k) expert ids directly."""
    T, k = expert_idx_TK.shape
    e_S = expert_idx_TK.reshape(-1)
    x_S1D = (x_TD[:, None].expand(T, k, x_TD.shape[1]) if k > 1 else x_TD[:, None])
    x_S1D = x_S1D.reshape(T * k, 1, x_TD.shape[1])
    h_S1H = act_forward(activation, torch.bmm(x_S1D, _gather(w1_EDH, e_S, "gathered_w1")))
    if w3_EDH is not None:
        h_S1H = h_S1H * torch.bmm(x_S1D, _gather(w3_EDH, e_S, "gathered_w3"))
    y_TKD = torch.bmm(h_S1H, _gather(w2_EHD, e_S, "gathered_w2")).view(T, k, -1)
    if weights_TK is None:
        return y_TKD.sum(1)
    # (T, 1, k) @ (T, k, d): the weighted sum over slots as one more bmm
    return torch.bmm(weights_TK.to(y_TKD.dtype).view(T, 1, k), y_TKD).view(T, -1)
