"""Mixture of attention heads (MoA, Zhang et al. 2022), as the UMoE paper's baseline (ref. A4).

Every expert is an attention head with its own full-rank query and output projections; one key
head and one value head are shared by all experts. With xn the normed layer input, x the value
input (xn under pre-LN, the raw residual under peri-LN) and p = softmax(xn W_r) (float32):

    q_i   = xn W_q^i,  K = Xn W_k,  V = X W_v                   d_k = head_dim, d_v = expert_dim
    o_i   = softmax(q_i K^T / sqrt(d_k)) V
    y     = sum_{i in topk(p)} p_i o_i W_o^i  +  o_0 W_o^0         head 0: the shared head

`attention.n_shared_experts > 0` adds the shared head (its own dense query and output, not
weighted). The k routed heads and the shared head of a token are one multi-query SDPA call
(k + 1 query heads against the single key/value head). The expert query and output projections
run through the routed engine with one plan: queries gather the token rows, outputs take each
(token, slot) head output as the pair's row and `combine` applies p.

G1 output gate (arXiv 2505.06708 eq. 5), `attention.gate.position: sdpa`: a routed head's gate
belongs to its expert, sigmoid(xn W_g^i) with W_g (E, d, d_v or 1) through the same plan; the
shared head has its own (d, d_v or 1) gate.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moelab.config import ModelConfig
from moelab.layers.attention import causal_attention, first_token_attention, norm_params
from moelab.layers.attn_experts import attention_router_config, check_attention_experts, gate_width
from moelab.layers.base import (Counts, ForwardContext, LayerCache, attention_core_macs,
                                linear_counts, mark_residual_out)
from moelab.layers.norms import make_norm
from moelab.layers.rope import RotaryEmbedding
from moelab.layers.routers import make_router
from moelab.ops import build_plan, combine, routed_matmul
from moelab.registry import ATTENTION


@ATTENTION.register("moa")
class MixtureOfAttentionHeads(nn.Module):
    default_router = "softmax_topk"

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        check_attention_experts(cfg, "moa")

    def __init__(self, cfg: ModelConfig, layer_idx: int, shared: dict | None = None):
        super().__init__()
        a, d = cfg.attention, cfg.d_model
        E, dk, dv = a.n_experts, cfg.head_dim, a.expert_dim or cfg.head_dim
        self.E, self.top_k, self.dk, self.dv = E, a.top_k, dk, dv
        self.n_shared = 1 if a.n_shared_experts else 0
        self.backend = cfg.moe_backend
        self.in_norm = make_norm(cfg) if cfg.norm.scheme == "peri" else nn.Identity()
        self.router = make_router(d, E, a.top_k, attention_router_config(cfg, self.default_router),
                                  name="attn_router")
        self.w_q_EDK = nn.Parameter(torch.randn(E, d, dk) * 0.02)
        self.w_o_EVD = nn.Parameter(torch.randn(E, dv, d) * 0.02)
        self.k_proj = nn.Linear(d, dk, bias=False)
        self.v_proj = nn.Linear(d, dv, bias=False)
        self.q_norm = make_norm(cfg, dk) if a.qk_norm else nn.Identity()
        self.k_norm = make_norm(cfg, dk) if a.qk_norm else nn.Identity()
        self.rope = RotaryEmbedding(dk, a.rope_fraction, a.rope_theta)
        self.gw = gate_width(cfg, dv)
        self.w_g_EDG = nn.Parameter(torch.randn(E, d, self.gw) * 0.02) if self.gw else None
        if self.n_shared:
            self.q_shared = nn.Linear(d, dk, bias=False)
            self.o_shared = nn.Linear(dv, d, bias=False)
            self.g_shared = nn.Linear(d, self.gw, bias=False) if self.gw else None
            mark_residual_out(self.o_shared.weight)
        mark_residual_out(self.w_o_EVD)

    def forward(self, x_BTD: torch.Tensor, cache: LayerCache | None, past: int,
                ctx: ForwardContext) -> torch.Tensor:
        B, T, D = x_BTD.shape
        N, k, ns = B * T, self.top_k, self.n_shared
        xn_BTD = self.in_norm(x_BTD)
        xn_ND = xn_BTD.reshape(N, D)
        r = self.router(xn_BTD, ctx)
        plan = build_plan(r.idx_BTK.reshape(N, k), self.E)
        q_NKD = plan.unsort_pairs(routed_matmul(xn_ND, self.w_q_EDK, plan, gather=True,
                                                backend=self.backend))
        if ns:  # shared head first (head 0), then the k routed heads
            q_NKD = torch.cat([self.q_shared(xn_ND)[:, None], q_NKD], dim=1)
        J = ns + k
        q_BJTD = self.rope(self.q_norm(q_NKD.view(B, T, J, self.dk)).transpose(1, 2), past,
                           ctx.rope)
        k_B1TD = self.rope(self.k_norm(self.k_proj(xn_BTD).view(B, T, 1, self.dk)).transpose(1, 2),
                           past, ctx.rope)
        v_B1TV = self.v_proj(x_BTD).view(B, 1, T, self.dv)
        if cache is not None:
            kv = cache.update(k=k_B1TD, v=v_B1TV)
            k_B1TD, v_B1TV = kv["k"], kv["v"]
        o_BJTV = causal_attention(q_BJTD, k_B1TD, v_B1TV, past)  # one multi-query SDPA call
        if ctx.diagnostics:
            ctx.add_diag("attn_first_token", first_token_attention(q_BJTD, k_B1TD, past))
        o_NJV = o_BJTV.transpose(1, 2).reshape(N, J, self.dv)
        if self.w_g_EDG is not None:  # G1: each head's gate, a routed head's from its expert
            g_NKG = plan.unsort_pairs(routed_matmul(xn_ND, self.w_g_EDG, plan, gather=True,
                                                    backend=self.backend))
            if ns:
                g_NKG = torch.cat([self.g_shared(xn_ND)[:, None], g_NKG], dim=1)
            o_NJV = o_NJV * torch.sigmoid(g_NKG)
        # split, not two slices: its backward is one cat, a slice's a zero-filled (N, J, dv) each
        o_shared_N1V, o_routed_NKV = o_NJV.split([ns, k], dim=1)
        y_SD = routed_matmul(plan.sort_pairs(o_routed_NKV), self.w_o_EVD, plan, gather=False,
                             backend=self.backend)
        y_ND = combine(y_SD, plan, r.weights_BTK.reshape(N, k).to(y_SD.dtype))
        if ns:
            y_ND = y_ND + self.o_shared(o_shared_N1V.squeeze(1))
        return y_ND.view(B, T, D)

    @staticmethod
    def count(cfg: ModelConfig, T: int, full_attention: bool = False) -> Counts:
        a, d, dk = cfg.attention, cfg.d_model, cfg.head_dim
        E, k, dv = a.n_experts, a.top_k, a.expert_dim or cfg.head_dim
        ns = 1 if a.n_shared_experts else 0
        gw = gate_width(cfg, dv)
        c = (linear_counts("attn.router", d, E, T) + linear_counts("attn.k_proj", d, dk, T)
             + linear_counts("attn.v_proj", d, dv, T))
        for name, per in (("attn.q_experts", d * dk), ("attn.o_experts", dv * d),
                          ("attn.gate", d * gw)):
            if per:
                c += Counts(E * per, k * per, T * k * per, {name: T * k * per})
        if ns:
            c += linear_counts("attn.q_shared", d, dk, T) + linear_counts("attn.o_shared", dv, d, T)
            if gw:
                c += linear_counts("attn.gate", d, gw, T)
        core = attention_core_macs(ns + k, T, dk, dv, full_attention)
        c += Counts(0, 0, core, {"attn.scores_mix": core})
        norm_p = (norm_params(cfg, dk) * 2 * a.qk_norm
                  + norm_params(cfg) * (cfg.norm.scheme == "peri"))
        return c + Counts(norm_p, norm_p, 0, {})
