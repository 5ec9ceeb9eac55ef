"""ExpertBank: E two-layer experts with stacked weights, executed by the routed-experts engine.

The bank owns parameters only; routing is the caller's (a router builds `expert_idx`, the caller
builds one `RoutingPlan` and may reuse it across several banks or matmuls). One bank instance may
be held by several layers (MoEUT-style sharing): `nn.Module.parameters()` de-duplicates it.

Under expert parallelism (`place`) a bank keeps only its rank's block of experts and its calls
send the routed rows to the owning ranks (moelab/ops/expert_parallel.py); `n_experts` stays the
bank's global count.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moelab.errors import ConfigError
from moelab.layers.base import Counts
from moelab.ops.activations import check_activation
from moelab.ops.backends import check_backend
from moelab.ops.expert_ffn import expert_ffn, expert_ffn_sorted
from moelab.ops.expert_parallel import ExpertPlacement, dispatched_expert_ffn_sorted
from moelab.ops.gathered import gathered_expert_ffn, use_gathered
from moelab.ops.plan import RoutingPlan, build_plan
from moelab.ops.routed import combine



def check_expert_count(field: str, kind: str, n_experts: int, top_k: int | None = None) -> None:
    """ConfigError unless a routed kind has experts and, when it chooses among them (`top_k`
    not None), routes each token to at least one: the config-time check of every routed
    attention and FFN kind (their `check_config`). `field`: e.g. "model.ffn"."""
    if n_experts < 1:
        raise ConfigError(f"{field}.n_experts: {n_experts}; {kind} needs at least one routed "
                          "expert")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"{field}.top_k: {top_k}; {kind} routes each token to top_k >= 1 of "
                          f"its {n_experts} experts (allowed: 1..{n_experts})")

class ExpertBank(nn.Module):
    """FFN_e(x) = act(x W1_e) W2_e, or (act(x W1_e) * (x W3_e)) W2_e when gated.

    Parameters: `w1_EDH` (E, d, h), `w2_EHD` (E, h, d) and, when gated, `w3_EDH` (E, d, h),
    initialised N(0, init_std) (the model may re-initialise them).
    """

    def __init__(self, n_experts: int, d_model: int, d_expert: int, activation: str = "silu",
                 gated: bool = False, backend: str = "auto", init_std: float = 0.02):
        super().__init__()
        if min(n_experts, d_model, d_expert) < 1:
            raise ValueError(f"ExpertBank sizes must be positive, got n_experts={n_experts}, "
                             f"d_model={d_model}, d_expert={d_expert}")
        self.n_experts, self.d_model, self.d_expert = n_experts, d_model, d_expert
        self.activation = check_activation(activation)
        self.backend = check_backend(backend)
        self.gated = gated
        self.w1_EDH = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w2_EHD = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        if gated:
            self.w3_EDH = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        else:
            self.register_parameter("w3_EDH", None)
        self.placement: ExpertPlacement | None = None  # set by `place` (expert parallelism)
        self.reset_parameters(init_std)

    def reset_parameters(self, std: float = 0.02) -> None:
        for p in (self.w1_EDH, self.w2_EHD, self.w3_EDH):
            if p is not None:
                nn.init.normal_(p, std=std)

    def place(self, placement: ExpertPlacement) -> None:
        """Keep only this rank's experts [first, first + n_local); calls become collective."""
        if self.placement is not None:
            raise RuntimeError("this expert bank is already placed")
        if placement.world * placement.n_local != self.n_experts:
            raise ValueError(f"{self.n_experts} experts cannot be placed as {placement.world} "
                             f"ranks x {placement.n_local}")
        for name in ("w1_EDH", "w2_EHD", "w3_EDH"):
            p = getattr(self, name)
            if p is not None:
                local = nn.Parameter(p.detach()[placement.local_slice()].clone(),
                                     requires_grad=p.requires_grad)
                local.__dict__.update(p.__dict__)  # init markers (residual-out, fan-in)
                setattr(self, name, local)
        self.placement = placement

    def extra_repr(self) -> str:
        s = (f"n_experts={self.n_experts}, d_model={self.d_model}, d_expert={self.d_expert}, "
             f"activation={self.activation}, gated={self.gated}, backend={self.backend}")
        if self.placement is not None:
            pl = self.placement
            last = pl.first + pl.n_local - 1
            s += f", placed=experts {pl.first}..{last} on rank {pl.rank}/{pl.world}"
        return s

    def _flat(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        x_TD = x.reshape(-1, self.d_model)
        if x_TD.shape[0] != plan.n_tokens:
            raise ValueError(f"input has {x_TD.shape[0]} tokens, the routing plan {plan.n_tokens}")
        if plan.n_experts != self.n_experts:
            raise ValueError(f"plan routes over {plan.n_experts} experts, bank has "
                             f"{self.n_experts}")
        return x_TD

    def forward(self, x: torch.Tensor, plan: RoutingPlan,
                weights_TK: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted sum of each token's k expert outputs, same shape as x ((T, d) or (..., d))."""
        x_TD = self._flat(x, plan)
        if self.placement is not None:
            y_TD = combine(self._dispatched(x_TD, plan), plan, weights_TK)
        else:
            y_TD = expert_ffn(x_TD, self.w1_EDH, self.w2_EHD, plan, weights_TK,
                              self.activation, self.w3_EDH, backend=self.backend)
        return y_TD.view(x.shape)

    def route(self, x: torch.Tensor, expert_idx_TK: torch.Tensor,
              weights_TK: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` from the router's (T, k) expert ids: builds the plan, or at decode sizes
        (backend `auto`, no gradient wanted) takes the plan-free gathered path of
        moelab/ops/gathered.py."""
        x_TD = x.reshape(-1, self.d_model)
        if (self.backend == "auto" and self.placement is None
                and x_TD.shape[0] == expert_idx_TK.shape[0]
                and use_gathered(x_TD, expert_idx_TK.numel(), self.n_experts, self.w1_EDH,
                                 self.w2_EHD, self.w3_EDH)):
            return gathered_expert_ffn(x_TD, self.w1_EDH, self.w2_EHD, expert_idx_TK,
                                       weights_TK, self.activation, self.w3_EDH).view(x.shape)
        return self(x, build_plan(expert_idx_TK, self.n_experts), weights_TK)

    def forward_sorted(self, x: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """Every (token, slot) expert output, (T*k, d) in the plan's sorted order, not combined.
        `plan.unsort_pairs(y)` gives (T, k, d) in token-major order."""
        x_TD = self._flat(x, plan)
        if self.placement is not None:
            return self._dispatched(x_TD, plan)
        return expert_ffn_sorted(x_TD, self.w1_EDH, self.w2_EHD, plan, self.activation,
                                 self.w3_EDH, backend=self.backend)

    def _dispatched(self, x_TD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        return dispatched_expert_ffn_sorted(x_TD, self.w1_EDH, self.w2_EHD, plan, self.placement,
                                            self.activation, self.w3_EDH, backend=self.backend)

    # --- analytic counts (MACs = multiply-accumulates; FLOPs = 2 x MACs) ---------------------
    @staticmethod
    def expert_macs(n_tokens: int, k: int, d_model: int, d_expert: int,
                    gated: bool = False) -> int:
        """Forward MACs of T tokens through k experts each: T*k*(d*h*(2 if gated else 1) + h*d)."""
        return n_tokens * k * (d_model * d_expert * (2 if gated else 1) + d_expert * d_model)

    @staticmethod
    def expert_params(n_experts: int, d_model: int, d_expert: int, gated: bool = False) -> int:
        return n_experts * d_model * d_expert * (3 if gated else 2)

    @staticmethod
    def count(n_experts: int, d_model: int, d_expert: int, n_tokens: int, k: int,
              gated: bool = False, name: str = "experts") -> Counts:
        """Counts(params, active params (k experts), forward MACs) for the model's FLOP tables."""
        macs = ExpertBank.expert_macs(n_tokens, k, d_model, d_expert, gated)
        return Counts(ExpertBank.expert_params(n_experts, d_model, d_expert, gated),
                      ExpertBank.expert_params(k, d_model, d_expert, gated), macs, {name: macs})

    def macs(self, n_tokens: int, k: int) -> int:
        return self.expert_macs(n_tokens, k, self.d_model, self.d_expert, self.gated)

    def flops(self, n_tokens: int, k: int) -> int:
        """Forward FLOPs (2 x MACs) of n_tokens routed to k experts each."""
        return 2 * self.macs(n_tokens, k)
