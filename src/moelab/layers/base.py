"""What every token mixer and channel mixer shares: the per-forward context, the per-layer KV
cache, and the analytic parameter/MAC count that each layer kind reports about itself."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn


@dataclass
class ForwardContext:
    """State of one forward pass, created fresh by `MoELM.forward` (never module-global, so
    gradient accumulation, activation checkpointing and DDP see independent passes).

    Layers add their balance losses with `add_aux` (already multiplied by their coefficient) and
    their routing statistics with `add_metric`; both are dropped when `stats` is off (generation
    and plain evaluation: about 1 ms per token of a tiny MoE went to them). `diagnostics` asks
    attention layers to report the attention-sink statistics of the gated-attention paper.
    `rope` holds the rotary cos/sin tables of this pass, computed once for every layer.
    """

    position: int = 0  # index of the current layer in the schedule (depth), set by the model
    token_emb_BTD: Optional[torch.Tensor] = None  # embedding output, for MoLE experts
    diagnostics: bool = False
    stats: bool = True  # balance losses and routing metrics (training, `report`)
    rope: dict = field(default_factory=dict)  # (rot_dim, theta, T, offset, dtype, device) -> tables
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    diag: dict[str, list] = field(default_factory=dict)
    stash: dict = field(default_factory=dict)  # cross-layer state of one pass (e.g. shared layers)

    def add_aux(self, name: str, value: torch.Tensor) -> None:
        if not self.stats:
            return
        key = f"layer{self.position}.{name}"
        self.aux_losses[key] = self.aux_losses[key] + value if key in self.aux_losses else value

    def add_metric(self, name: str, value: torch.Tensor) -> None:
        if not self.stats:
            return
        self.metrics[f"layer{self.position}.{name}"] = value.detach()

    def add_diag(self, name: str, value: torch.Tensor) -> None:
        self.diag.setdefault(name, []).append(value.detach().float())


class LayerCache:
    """The cache of one layer position: named tensors grown along the time axis (dim -2).

    Each attention kind decides what it stores (dense: keys and values; UMoE: one key head plus
    the normed hidden states), so the cache has no fixed layout. `tensors[name]` is always the
    valid prefix; outside autograd it is a view of a preallocated buffer of `capacity` positions
    (growing by doubling past it), so a decode step writes one position instead of copying the
    whole cache as `torch.cat` does. Callers may replace `tensors` (the transformers wrapper
    reorders and crops them, zero-shot scoring expands them): an entry that is no longer the
    prefix of its buffer is copied into a fresh one at the next update.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.capacity = capacity
        self._buffers: dict[str, torch.Tensor] = {}

    def update(self, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        for name, t in new.items():
            old = self.tensors.get(name)
            if t.requires_grad or (old is not None and old.requires_grad):
                # under autograd an in-place write would invalidate earlier steps' graphs
                self._buffers.pop(name, None)
                self.tensors[name] = t if old is None else torch.cat([old, t], dim=-2)
                continue
            n_old = 0 if old is None else old.shape[-2]
            n = n_old + t.shape[-2]
            buf = self._buffers.get(name)
            if old is None or not _is_prefix(old, buf, t, n):
                cap = max(n, self.capacity or 0)
                if buf is not None:  # keep the size; double it when full (amortised growth)
                    cap = max(cap, buf.shape[-2] * (2 if buf.shape[-2] < n else 1))
                buf = t.new_empty(*t.shape[:-2], cap, t.shape[-1])
                if old is not None:
                    buf[..., :n_old, :].copy_(old)
                self._buffers[name] = buf
            buf[..., n_old:n, :].copy_(t)
            self.tensors[name] = buf[..., :n, :]
        return {name: self.tensors[name] for name in new}

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def _is_prefix(old: torch.Tensor, buf: torch.Tensor | None, t: torch.Tensor, n: int) -> bool:
    """Whether `old` is still buf[..., :len, :] and buf can take `t` up to n positions."""
    return (buf is not None and old.data_ptr() == buf.data_ptr() and old.stride() == buf.stride()
            and old.shape[:-2] == buf.shape[:-2] == t.shape[:-2]
            and old.shape[-1] == buf.shape[-1] == t.shape[-1]
            and buf.dtype == t.dtype and buf.device == t.device and buf.shape[-2] >= n)


class KVCache:
    """Caches for every layer position of a model (shared layers get one cache per repeat).
    `capacity`: the positions to preallocate (prompt + new tokens when generating)."""

    def __init__(self, n_positions: int, capacity: int | None = None) -> None:
        self.layers = [LayerCache(capacity) for _ in range(n_positions)]
        self.seq_len = 0  # tokens already cached = RoPE offset of the next token

    def numel(self) -> int:
        return sum(layer.numel() for layer in self.layers)


@dataclass
class Counts:
    """Parameters and forward MACs of a component for one sequence of T tokens.

    MACs count multiply-accumulates of matrix products only (linear maps, attention scores and
    mixing), the convention of the papers' profilers and of `torch.utils.flop_counter`
    (FLOPs = 2 x MACs). Elementwise work (norms, activations, softmax) is not counted.
    """

    params: int = 0
    active_params: int = 0
    macs: int = 0
    parts: dict[str, int] = field(default_factory=dict)  # MACs per sub-component

    def __add__(self, other: "Counts") -> "Counts":
        parts = dict(self.parts)
        for k, v in other.parts.items():
            parts[k] = parts.get(k, 0) + v
        return Counts(self.params + other.params, self.active_params + other.active_params,
                      self.macs + other.macs, parts)

    def scaled_macs(self, n: int) -> "Counts":
        """The same parameters used n times (a shared layer repeated n times)."""
        return Counts(self.params, self.active_params, self.macs * n,
                      {k: v * n for k, v in self.parts.items()})


def linear_counts(name: str, d_in: int, d_out: int, T: int, bias: bool = False) -> Counts:
    p = d_in * d_out + (d_out if bias else 0)
    return Counts(p, p, T * d_in * d_out, {name: T * d_in * d_out})


def attention_core_macs(n_heads: int, T: int, d_qk: int, d_v: int, full: bool,
                        past: int = 0) -> int:
    """MACs of scores (q k^T) and mixing (a V) for T queries over past + T keys.

    Causal counting sums the keys each query really sees; `full` counts the whole T x (past+T)
    rectangle, as profilers of a dense matmul implementation (and the papers) do.
    """
    keys = T * (past + T) if full else T * past + T * (T + 1) // 2
    return n_heads * keys * (d_qk + d_v)


def mark_residual_out(*params: nn.Parameter) -> None:
    """Tag parameters that write into the residual stream (depth-scaled init scales them)."""
    for p in params:
        p._moelab_residual_out = True  # type: ignore[attr-defined]


def keep_init(*params: nn.Parameter) -> None:
    """Tag parameters whose module-specific init the model initialiser must not overwrite."""
    for p in params:
        p._moelab_keep_init = True  # type: ignore[attr-defined]
