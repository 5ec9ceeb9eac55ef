"""Routed FFN channel mixers: top-k MoE with shared experts, and σ-MoE (MoEUT).

Both run their experts through an `ExpertBank` (the routed-experts engine), so the bank can be
held by several layers (UMoE's attention and FFN, MoEUT's repeats).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from moelab.config import ModelConfig
from moelab.layers.base import Counts, ForwardContext, linear_counts, mark_residual_out
from moelab.layers.experts import ExpertBank, check_expert_count
from moelab.layers.ffn import DenseFFN
from moelab.layers.init import set_fan_in
from moelab.layers.norms import make_norm
from moelab.layers.routers import make_router
from moelab.ops import build_plan
from moelab.ops.plan import within_capacity
from moelab.registry import FFN


@FFN.register("moe")
class MoEFFN(nn.Module):
    """y = sum_{e in top-k} w_e FFN_e(x) + sum_s FFN_shared_s(x)  (DeepSeek / UMoE FFN-MoE).

    The router is `config.router` (softmax top-k by default); the shared experts are one dense
    FFN of width n_shared x shared_expert_dim, unweighted.
    """

    router_kind: str | None = None  # None: the config's router.kind

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        f = cfg.ffn
        check_expert_count("model.ffn", f"ffn kind {f.kind!r}", f.n_experts, f.top_k)

    def __init__(self, cfg: ModelConfig, layer_idx: int, shared: dict | None = None,
                 bank: ExpertBank | None = None):
        super().__init__()
        f, d = cfg.ffn, cfg.d_model
        self.n_experts, self.top_k = f.n_experts, f.top_k
        self.capacity_factor, self.drop_policy = f.capacity_factor, f.drop_policy
        rcfg = cfg.router if self.router_kind is None else _with_kind(cfg.router, self.router_kind)
        extra = {"expert_dropout": f.expert_dropout} if rcfg.kind == "sigmoid_topk" else {}
        # peri-LN: the router (it feeds a softmax/sigmoid) reads a normed input, experts the raw one
        self.router_norm = make_norm(cfg) if cfg.norm.scheme == "peri" else nn.Identity()
        self.router = make_router(d, f.n_experts, f.top_k, rcfg, name="ffn_router", **extra)
        self.experts = bank if bank is not None else ExpertBank(
            f.n_experts, d, f.expert_dim, activation=f.activation, gated=f.gated,
            backend=cfg.moe_backend)
        mark_residual_out(self.experts.w2_EHD)
        shared_width = f.n_shared_experts * (f.shared_expert_dim or f.expert_dim)
        self.shared = DenseFFN(cfg, layer_idx, d_ff=shared_width) if shared_width else None
        # Qwen2-MoE: the shared experts' output is scaled by a per-token sigmoid gate
        self.shared_gate = nn.Linear(d, 1, bias=False) if f.shared_gate else None

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, D = x_BTD.shape
        r = self.router(self.router_norm(x_BTD), ctx)
        idx_TK = r.idx_BTK.reshape(B * T, -1)
        w_TK = r.weights_BTK.reshape(B * T, -1).to(x_BTD.dtype)
        if self.training and self.capacity_factor:
            plan = build_plan(idx_TK, self.n_experts)
            w_TK = w_TK * self._within_capacity(plan, r.weights_BTK, ctx)
            y_TD = self.experts(x_BTD.reshape(B * T, D), plan, w_TK)
        else:  # the bank builds the plan (or skips it at decode sizes)
            y_TD = self.experts.route(x_BTD.reshape(B * T, D), idx_TK, w_TK)
        y_BTD = y_TD.view(B, T, D)
        if self.shared is not None:
            s_BTD = self.shared(x_BTD, ctx)
            if self.shared_gate is not None:
                s_BTD = s_BTD * torch.sigmoid(self.shared_gate(x_BTD))
            y_BTD = y_BTD + s_BTD
        return y_BTD

    def _within_capacity(self, plan, weights_BTK: torch.Tensor,
                         ctx: ForwardContext) -> torch.Tensor:
        """(T, k) 0/1: the pairs an expert has room for (Switch capacity, training only; the
        engine still runs the dropped pairs, their outputs are weighted 0)."""
        capacity = math.ceil(self.capacity_factor * plan.n_pairs / self.n_experts)
        priority = weights_BTK.reshape(plan.n_tokens, -1) if self.drop_policy == "score" else None
        keep_TK = within_capacity(plan, capacity, priority)
        ctx.add_metric(f"{self.router.name}.dropped", 1 - keep_TK.float().mean())
        return keep_TK.to(weights_BTK.dtype)

    @classmethod
    def count(cls, cfg: ModelConfig, T: int, full_attention: bool = False) -> Counts:
        f, d = cfg.ffn, cfg.d_model
        per_expert = d * f.expert_dim * (3 if f.gated else 2)
        router = linear_counts("ffn.router", d, f.n_experts, T)
        experts = Counts(f.n_experts * per_expert, f.top_k * per_expert,
                         T * f.top_k * per_expert, {"ffn.experts": T * f.top_k * per_expert})
        c = router + experts
        shared_width = f.n_shared_experts * (f.shared_expert_dim or f.expert_dim)
        if shared_width:
            c += DenseFFN.count(cfg, T, d_ff=shared_width)
        if f.shared_gate:
            c += linear_counts("ffn.shared_gate", d, 1, T)
        if cfg.norm.scheme == "peri":
            from moelab.layers.attention import norm_params

            c += Counts(norm_params(cfg), norm_params(cfg), 0, {})
        return c


@FFN.register("sigma_moe")
class SigmaMoEFFN(MoEFFN):
    """σ-MoE (MoEUT reference sec. 1.2): sigmoid top-k router, gates = raw sigmoid scores, many
    small experts (128 by default), optional expert dropout, entropy regulariser from
    `router.entropy_coef`. Activation and gating come from `ffn.activation` / `ffn.gated`
    (the paper: relu, not gated)."""

    router_kind = "sigmoid_topk"

    def __init__(self, cfg: ModelConfig, layer_idx: int, shared: dict | None = None,
                 bank: ExpertBank | None = None):
        super().__init__(cfg, layer_idx, shared=shared, bank=bank)
        # MoEUT init draws the output experts with std s / sqrt(E * expert_dim) (reference 1.5)
        set_fan_in(self.experts.w2_EHD, cfg.ffn.n_experts * cfg.ffn.expert_dim)


def _with_kind(rcfg, kind):
    import dataclasses

    return dataclasses.replace(rcfg, kind=kind)
