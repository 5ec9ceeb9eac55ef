"""Routing plan: the router's (token, slot) -> expert choice, sorted by expert, built once.

Symbols: T tokens, k slots per token, S = T*k routed pairs, E experts. A *pair* is one (token,
slot) choice; its *flat* index is t*k + j (row-major in `expert_idx_TK`). Every engine op works
on pairs in *sorted* order: grouped by expert, stable inside an expert (so token order is kept,
which makes the gathers of one expert walk memory forwards).

The plan is computed with a handful of vectorised ops and then shared by every matmul of an
expert (both layers of an FFN, value and output projections of an attention expert) and by their
backward passes, so the sort is paid once per routing decision, not once per matmul.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class RoutingPlan:
    """Sorted view of a routing decision. Build it with `build_plan`, never by hand."""

    n_experts: int
    n_tokens: int
    top_k: int
    order_S: torch.Tensor  # sorted position -> flat pair index (long)
    rows_S: torch.Tensor  # sorted position -> token row of that pair (long)
    inverse_S: torch.Tensor  # flat pair index -> sorted position (long); inverts order_S
    expert_S: torch.Tensor  # sorted position -> expert id (long, non-decreasing)
    offsets_E1: torch.Tensor  # (E+1,) long: expert e owns sorted positions [off[e], off[e+1])
    # Host copies and derived tensors, computed on first use. A host copy costs a device sync
    # on accelerators, so only backends that loop over experts in Python ask for it.
    _counts: list[int] | None = field(default=None, repr=False)
    _offsets_i32: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n_pairs(self) -> int:
        return self.n_tokens * self.top_k

    @property
    def device(self) -> torch.device:
        return self.order_S.device

    @property
    def counts_E(self) -> torch.Tensor:
        """(E,) pairs routed to each expert, on the plan's device (no sync)."""
        return self.offsets_E1[1:] - self.offsets_E1[:-1]

    def counts(self) -> list[int]:
        """Per-expert pair counts as a Python list (one device->host copy, then cached)."""
        if self._counts is None:
            self._counts = self.counts_E.tolist()
        return self._counts

    def max_count(self) -> int:
        return max(self.counts(), default=0)

    def offsets_i32(self) -> torch.Tensor:
        """(E,) int32 *end* offsets, the layout `torch.nn.functional.grouped_mm` expects."""
        if self._offsets_i32 is None:
            self._offsets_i32 = self.offsets_E1[1:].to(torch.int32)
        return self._offsets_i32

    def sort_pairs(self, v_TK: torch.Tensor) -> torch.Tensor:
        """Reorder a per-pair tensor (T, k, ...) into sorted order (S, ...). Differentiable."""
        return v_TK.reshape(self.n_pairs, *v_TK.shape[2:]).index_select(0, self.order_S)

    def unsort_pairs(self, v_S: torch.Tensor) -> torch.Tensor:
        """Inverse of `sort_pairs`: (S, ...) sorted -> (T, k, ...). Differentiable."""
        return v_S.index_select(0, self.inverse_S).view(self.n_tokens, self.top_k, *v_S.shape[1:])


def build_plan(expert_idx_TK: torch.Tensor, n_experts: int) -> RoutingPlan:
    """Plan for `expert_idx_TK` (long, (T, k); any leading shape is flattened into T).

    No Python loop over tokens and no host sync on accelerators: stable sort of the flat expert
    ids, a scatter-add for the per-expert counts (bincount would sync on CUDA to size its output),
    a cumsum for the offsets and a scatter for the inverse permutation.
    """
    if expert_idx_TK.dim() == 1:
        expert_idx_TK = expert_idx_TK[:, None]
    idx_TK = expert_idx_TK.reshape(-1, expert_idx_TK.shape[-1])
    if idx_TK.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"expert indices must be an integer tensor, got {idx_TK.dtype}")
    T, k = idx_TK.shape
    device = idx_TK.device
    flat_S = idx_TK.reshape(-1).long()
    if device.type == "cpu" and flat_S.numel() > 0:
        # Cheap here (no sync); on CUDA an out-of-range id trips the scatter's device assert.
        lo, hi = int(flat_S.min()), int(flat_S.max())
        if lo < 0 or hi >= n_experts:
            raise ValueError(f"expert index out of range [0, {n_experts}): saw {lo}..{hi}")
    expert_S, order_S = torch.sort(flat_S, stable=True)
    counts_E = torch.zeros(n_experts, dtype=torch.long, device=device)
    counts_E.scatter_add_(0, flat_S, torch.ones_like(flat_S))
    offsets_E1 = torch.zeros(n_experts + 1, dtype=torch.long, device=device)
    torch.cumsum(counts_E, 0, out=offsets_E1[1:])
    inverse_S = torch.empty_like(order_S)
    inverse_S[order_S] = torch.arange(order_S.numel(), device=device)
    rows_S = torch.div(order_S, k, rounding_mode="floor") if k > 1 else order_S
    plan = RoutingPlan(n_experts, T, k, order_S, rows_S, inverse_S, expert_S, offsets_E1)
    if device.type == "cpu":
        plan._counts = counts_E.tolist()  # free on the host; every CPU backend wants it
    return plan
