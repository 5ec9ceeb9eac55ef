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


def bucket_rows(n: int) -> int:
    """n rounded up to a power of two below 64, else to a multiple of 64.

    oneDNN (the CPU bf16/fp16 matmul library) JIT-compiles one kernel per matmul shape: about
    1.5 ms for a new (1000 x 512) @ (512 x 128) shape against 0.14 ms to run it. Per-expert row
    counts change with every routing decision, so without bucketing a training step would
    compile hundreds of kernels (and thrash oneDNN's 1024-entry cache). Bucketed, the fine
    benchmark shape uses a handful of row counts; the padding costs at most 63 rows per expert.
    """
    if n <= 0:
        return 0
    return 1 << (n - 1).bit_length() if n <= 64 else -(-n // 64) * 64


@dataclass(eq=False)
class BucketedLayout:
    """The sorted layout with every expert's segment padded to `bucket_rows(count)` rows; real
    pairs first, padding rows (token 0, router weight 0) after them."""

    counts: list[int]  # padded rows per expert
    offsets: list[int]  # padded start of every expert
    n_rows: int  # total padded rows P
    rows_P: torch.Tensor  # token row of every padded position (padding -> row 0)
    pos_S: torch.Tensor  # padded position of every sorted pair
    inverse_TK: torch.Tensor  # padded position of every (token, slot)

    def scatter_pairs(self, v_S: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(S,) sorted per-pair values -> (P,), `fill` on padding rows."""
        out = v_S.new_full((self.n_rows,), fill)
        return out.index_copy_(0, self.pos_S, v_S)


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
    _bucketed: BucketedLayout | None = field(default=None, repr=False)

    @property
    def n_pairs(self) -> int:
        return self.n_tokens * self.top_k

    @property
    def device(self) -> torch.device:
        return self.order_S.device

    @property
    def inverse_TK(self) -> torch.Tensor:
        """(T, k) sorted position of every pair: the bag layout of `F.embedding_bag`."""
        return self.inverse_S.view(self.n_tokens, self.top_k)

    @property
    def counts_E(self) -> torch.Tensor:
        """(E,) pairs routed to each expert, on the plan's device (no sync)."""
        return self.offsets_E1[1:] - self.offsets_E1[:-1]

    def counts(self) -> list[int]:
        """Per-expert pair counts as a Python list (one device->host copy, then cached)."""
        if self._counts is None:
            self._counts = self.counts_E.tolist()
        return self._counts

    def offsets_host(self) -> list[int]:
        """Start offset of every expert, as a Python list (from the cached host counts)."""
        out, o = [], 0
        for n in self.counts():
            out.append(o)
            o += n
        return out

    def bucketed(self) -> BucketedLayout:
        """The row-bucketed layout (cached): see `bucket_rows`."""
        if self._bucketed is None:
            counts = [bucket_rows(n) for n in self.counts()]
            offsets, o = [], 0
            for n in counts:
                offsets.append(o)
                o += n
            dev = self.device
            pad_start_E = torch.tensor(offsets, dtype=torch.long, device=dev)
            rank_S = torch.arange(self.n_pairs, device=dev) - self.offsets_E1[self.expert_S]
            pos_S = pad_start_E[self.expert_S] + rank_S
            rows_P = torch.zeros(o, dtype=torch.long, device=dev).index_copy_(0, pos_S,
                                                                              self.rows_S)
            inverse_TK = pos_S[self.inverse_S].view(self.n_tokens, self.top_k)
            self._bucketed = BucketedLayout(counts, offsets, o, rows_P, pos_S, inverse_TK)
        return self._bucketed

    def max_count(self) -> int:
        return max(self.counts(), default=0)

    def host_max_count(self) -> int | None:
        """`max_count` where it costs no device sync (a CPU plan), else None."""
        return self.max_count() if self.device.type == "cpu" else None

    def offsets_i32(self) -> torch.Tensor:
        """(E,) int32 *end* offsets, the layout `torch.nn.functional.grouped_mm` expects."""
        if self._offsets_i32 is None:
            self._offsets_i32 = self.offsets_E1[1:].to(torch.int32)
        return self._offsets_i32

    def regrouped(self, k: int) -> "RoutingPlan":
        """The same sorted pairs seen as groups of k consecutive slots: each token's top_k
        slots split into top_k / k groups (SwitchHead: one group of k experts per head), so
        `combine` sums each group, (n_tokens * top_k / k, O). Shares every tensor but rows_S."""
        if self.top_k % k:
            raise ValueError(f"cannot split {self.top_k} slots per token into groups of {k}")
        return RoutingPlan(self.n_experts, self.n_tokens * (self.top_k // k), k, self.order_S,
                           torch.div(self.order_S, k, rounding_mode="floor") if k > 1
                           else self.order_S, self.inverse_S, self.expert_S, self.offsets_E1,
                           _counts=self._counts)

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


def within_capacity(plan: RoutingPlan, capacity: int,
                    priority_TK: torch.Tensor | None = None) -> torch.Tensor:
    """(T, k) bool: whether each (token, slot) pair is among the first `capacity` pairs of its
    expert. First means in token order (Switch Transformer: later tokens overflow) or, given
    `priority_TK`, highest priority first (batch prioritized routing, V-MoE)."""
    S = plan.n_pairs
    if priority_TK is None:  # the plan's order is already token order inside each expert
        order_S = plan.order_S
    else:
        expert_P = torch.empty_like(plan.expert_S)
        expert_P[plan.order_S] = plan.expert_S  # expert of every flat pair
        by_priority = torch.argsort(-priority_TK.reshape(-1).detach(), stable=True)
        order_S = by_priority[torch.argsort(expert_P[by_priority], stable=True)]
    rank_S = torch.arange(S, device=plan.device) - plan.offsets_E1[plan.expert_S]
    keep_P = torch.empty(S, dtype=torch.bool, device=plan.device)
    keep_P[order_S] = rank_S < capacity
    return keep_P.view(plan.n_tokens, plan.top_k)
