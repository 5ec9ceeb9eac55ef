"""Mixture of Lookup Experts (MoLE, Jie et al., ICML 2025, arXiv 2503.15798).

Training form (`ffn.kind: mole`), per layer, with h1 the residual after attention and
x = norm(h1) the block-normed FFN input (pre-LN):

    g      = softmax(x R)                         over all N experts, float32   (MoLE eq. 4)
    y      = FFN_shared(x) + sum_j g_j FFN_j(RMSNorm_l(e))                       (MoLE eq. 5)

where e is the token-embedding output (`ctx.token_emb_BTD`) and RMSNorm_l is this layer's own
expert norm. No top-k and, by default, no balance loss (the paper's Table 4: auxiliary losses
hurt). The routed experts are non-gated GELU MLPs of width `ffn.expert_dim` (the paper's D_r),
the shared expert a dense FFN of width `ffn.d_ff` (D_s); the paper uses D_r = D_s.

Because an expert's input depends only on the token id, FFN_j(RMSNorm_l(e_i)) can be computed once
for every vocabulary entry i after training (re-parameterisation, MoLE sec. 3.3): the inference
form (`ffn.kind: mole_lookup`) keeps the router and the shared expert and replaces the experts
by rows of a lookup table, y = FFN_shared(x) + sum_j g_j v_j^{id}. Its rows come from a
`RowSource` (moelab/export/mole_model.py) attached after construction.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
import torch.nn as nn

from moelab.config import ModelConfig
from moelab.errors import ConfigError
from moelab.layers.attention import norm_params
from moelab.layers.base import Counts, ForwardContext, linear_counts, mark_residual_out
from moelab.layers.experts import ExpertBank, check_expert_count
from moelab.layers.ffn import DenseFFN
from moelab.layers.norms import make_norm
from moelab.layers.routers import make_router
from moelab.ops import build_plan, expert_ffn
from moelab.registry import FFN

class _MoLEBase(nn.Module):
    """What both forms share: the dense-softmax router on the normed hidden state and the
    shared expert (a dense FFN of width `ffn.d_ff`, not gated by the router)."""

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        f = cfg.ffn
        check_expert_count("model.ffn", f"the {f.kind} FFN", f.n_experts)  # all N: no top-k
        if cfg.router.bias_rate:
            raise ConfigError(f"model.router.bias_rate: {cfg.router.bias_rate}, but the {f.kind} "
                              "FFN's router uses every expert: there is no choice to balance; "
                              "set it to 0")

    def __init__(self, cfg: ModelConfig, layer_idx: int, shared: dict | None = None):
        super().__init__()
        f, d = cfg.ffn, cfg.d_model
        self.n_experts, self.d_model, self.layer_idx = f.n_experts, d, layer_idx
        # peri-LN hands the FFN the raw residual: only the router (it feeds a softmax) is normed
        self.router_norm = make_norm(cfg) if cfg.norm.scheme == "peri" else nn.Identity()
        rcfg = dataclasses.replace(cfg.router, kind="softmax_dense")  # MoLE eq. 4: all N experts
        self.router = make_router(d, f.n_experts, f.n_experts, rcfg, name="mole_router")
        self.shared = DenseFFN(cfg, layer_idx)

    def gates(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """g_BTN = softmax(norm(h1) R) in float32 (balance losses/metrics go to ctx)."""
        return self.router(self.router_norm(x_BTD), ctx).weights_BTK

    @staticmethod
    def _shared_counts(cfg: ModelConfig, T: int) -> Counts:
        c = linear_counts("ffn.router", cfg.d_model, cfg.ffn.n_experts, T) + DenseFFN.count(cfg, T)
        if cfg.norm.scheme == "peri":
            c += Counts(norm_params(cfg), norm_params(cfg), 0, {})
        return c


@FFN.register("mole")
class MoLEFFN(_MoLEBase):
    """Training form: every token runs through all N routed experts on its own embedding."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, shared: dict | None = None):
        super().__init__(cfg, layer_idx, shared)
        f = cfg.ffn
        self.expert_norm = make_norm(cfg)  # RMSNorm_l(e): per layer, folded into the table later
        self.experts = ExpertBank(f.n_experts, cfg.d_model, f.expert_dim, activation=f.activation,
                                  gated=f.gated, backend=cfg.moe_backend)
        mark_residual_out(self.experts.w2_EHD)

    def expert_outputs(self, e_UD: torch.Tensor) -> torch.Tensor:
        """FFN_j(RMSNorm_l(e)) for every row and every expert, (U, N, d): the table rows.

        Runs through the engine with the all-experts plan (idx = arange(N) for every row, k = N);
        a dense batched matmul over (N, T, d) was measured and is not faster on CPU (docs/mole.md).
        """
        U = e_UD.shape[0]
        plan = build_plan(self._all_experts(U, e_UD.device), self.n_experts)
        y_SD = self.experts.forward_sorted(self.expert_norm(e_UD), plan)
        return plan.unsort_pairs(y_SD)

    def _all_experts(self, n_rows: int, device) -> torch.Tensor:
        return torch.arange(self.n_experts, device=device).expand(n_rows, self.n_experts)

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if ctx.token_emb_BTD is None:
            raise RuntimeError("the mole FFN needs ctx.token_emb_BTD (the embedding output); "
                               "MoELM.forward provides it")
        B, T, D = x_BTD.shape
        g_TN = self.gates(x_BTD, ctx).reshape(B * T, self.n_experts)
        e_TD = self.expert_norm(ctx.token_emb_BTD.reshape(B * T, D))
        plan = build_plan(self._all_experts(B * T, x_BTD.device), self.n_experts)
        bank = self.experts
        y_TD = expert_ffn(e_TD, bank.w1_EDH, bank.w2_EHD, plan, g_TN.to(x_BTD.dtype),
                          bank.activation, bank.w3_EDH, backend=bank.backend)
        return y_TD.view(B, T, D) + self.shared(x_BTD, ctx)

    @staticmethod
    def count(cfg: ModelConfig, T: int, full_attention: bool = False) -> Counts:
        f, d = cfg.ffn, cfg.d_model
        experts = ExpertBank.count(f.n_experts, d, f.expert_dim, T, f.n_experts, f.gated,
                                   name="ffn.experts")
        expert_norm = norm_params(cfg)
        return (_MoLEBase._shared_counts(cfg, T) + experts
                + Counts(expert_norm, expert_norm, 0, {}))


class RowSource(Protocol):
    """Where the inference form gets its table rows: the current tokens' rows of one distinct
    layer, dequantised, (B, T, N, d) in `dtype` on `device`."""

    def rows(self, layer_idx: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        ...


@FFN.register("mole_lookup")
class MoLELookupFFN(_MoLEBase):
    """Inference form after re-parameterisation (MoLE sec. 3.3): y = FFN_shared(x) +
    sum_j g_j LUT_l[id, j]. No expert weights; the rows come from the attached `RowSource`
    (built by `moelab.export.mole_model.load_converted`, not from a config alone)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, shared: dict | None = None):
        super().__init__(cfg, layer_idx, shared)
        self.source: RowSource | None = None

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.source is None:
            raise RuntimeError("the mole_lookup FFN has no lookup tables attached; load a "
                               "converted directory with moelab.export.mole_model.load_converted")
        # MoLE eq. 4 as the softmax_dense router computes it in eval mode, without its
        # training-time routing metrics (the load is uniform by construction): they were a
        # third of the per-layer overhead of a decode step on CPU.
        logits_BTN = self.router_norm(x_BTD).float() @ self.router.weight.float().t()
        g_BTN = logits_BTN.softmax(-1).to(x_BTD.dtype)
        v_BTND = self.source.rows(self.layer_idx, x_BTD.device, x_BTD.dtype)
        # the weighted sum over experts of the looked-up rows: (BT, 1, N) @ (BT, N, d)
        B, T, N, D = v_BTND.shape
        y_BTD = torch.bmm(g_BTN.reshape(B * T, 1, N), v_BTND.reshape(B * T, N, D)).view(B, T, D)
        return y_BTD + self.shared(x_BTD, ctx)

    @staticmethod
    def count(cfg: ModelConfig, T: int, full_attention: bool = False) -> Counts:
        N, d = cfg.ffn.n_experts, cfg.d_model
        mix = T * N * d  # the gate-weighted sum of N looked-up rows (a bmm)
        return _MoLEBase._shared_counts(cfg, T) + Counts(0, 0, mix, {"ffn.lookup_mix": mix})
