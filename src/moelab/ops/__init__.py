"""Routed-experts engine: every expert computation in moelab goes through here.

    plan = build_plan(expert_idx_TK, n_experts)          # once per routing decision
    y_SO = routed_matmul(x_TI, w_EIO, plan, gather=True)  # sorted (T*k, O)
    y_TO = combine(y_SO, plan, weights_TK)                # back to tokens, weighted
    y_TD = expert_ffn(x_TD, w1_EDH, w2_EHD, plan, weights_TK, "silu")  # both matmuls, fused

See docs/engine.md for the backends and the automatic choice.
"""
from moelab.ops.backends import BACKENDS, CHOICES, check_backend, choose_backend, resolve_backend
from moelab.ops.expert_ffn import expert_ffn, expert_ffn_sorted
from moelab.ops.parallel import set_expert_threads
from moelab.ops.plan import RoutingPlan, build_plan
from moelab.ops.routed import combine, routed_matmul
from moelab.ops.workspace import release_workspace

__all__ = [
    "BACKENDS", "CHOICES", "RoutingPlan", "build_plan", "check_backend", "choose_backend",
    "combine", "expert_ffn", "expert_ffn_sorted", "release_workspace", "resolve_backend",
    "routed_matmul", "set_expert_threads",
]
