"""Analytic parameter and MAC counts, computed from the config alone (no model is built).

Each layer kind reports its own counts through a `count(cfg, T, full_attention)` static method;
this module composes them: embedding, the distinct layers (a shared layer's parameters once, its
MACs once per repeat), the final norm and the head. MACs are multiply-accumulates of matrix
products for a batch of B sequences of T tokens, forward only (FLOPs = 2 x MACs), the convention
of `torch.utils.flop_counter`. Attention score/mix MACs count the causal triangle by default;
`full_attention=True` counts the whole T x T square as the papers' profilers do.
"""
from __future__ import annotations

from moelab.errors import ConfigError
from moelab.config import ModelConfig
from moelab.layers.attention import norm_params
from moelab.layers.base import Counts
from moelab.registry import ATTENTION, FFN


def block_counts(cfg: ModelConfig, T: int, full_attention: bool = False) -> Counts:
    """One distinct block for one sequence of T tokens."""
    norms = 0 if cfg.norm.scheme == "peri" else 2 * norm_params(cfg)
    return (Counts(norms, norms, 0, {})
            + ATTENTION.get(cfg.attention.kind).count(cfg, T, full_attention)
            + FFN.get(cfg.ffn.kind).count(cfg, T, full_attention))


def count(cfg: ModelConfig, batch: int = 1, seq_len: int | None = None,
          full_attention: bool = False) -> dict:
    """Parameters (total, active) and forward MACs of `cfg` for a batch x seq_len input.

    Returns a JSON-ready dict: `params_total`, `params_active`, `params_embedding`,
    `macs_forward`, `macs_per_token`, and `components` (MACs per component, and the
    parameters of embedding / layers / final norm / head).
    """
    if batch < 1:
        raise ConfigError(f"batch {batch}: expected a positive number of sequences")
    if seq_len is not None and not 1 <= seq_len <= cfg.max_seq_len:
        raise ConfigError(f"seq_len {seq_len}: expected 1..{cfg.max_seq_len} "
                          "(model.max_seq_len)")
    T = seq_len or cfg.max_seq_len
    V, d = cfg.vocab_size, cfg.d_model
    repeats = cfg.n_layers // cfg.n_distinct_layers
    layer = block_counts(cfg, T, full_attention)
    layers = Counts(layer.params * cfg.n_distinct_layers, layer.active_params * cfg.n_distinct_layers,
                    0, {})
    layers += Counts(0, 0, layer.macs * cfg.n_layers,
                     {k: v * cfg.n_layers for k, v in layer.parts.items()})
    embed = V * d
    head_params = (0 if cfg.tie_embeddings else V * d) + (V if cfg.head_bias else 0)
    final_norm = norm_params(cfg)
    head_macs = T * d * V
    total = embed + layers.params + final_norm + head_params
    active = embed + layers.active_params + final_norm + head_params
    macs_seq = layers.macs + head_macs
    parts = {k: v * batch for k, v in layers.parts.items()}
    parts["head"] = head_macs * batch
    return {
        "params_total": total,
        "params_active": active,
        "params_embedding": embed,
        "params_non_embedding": total - embed - head_params,
        "params_per_layer": layer.params,
        "layer_repeats": repeats,
        "batch": batch,
        "seq_len": T,
        "full_attention": full_attention,
        "macs_forward": macs_seq * batch,
        "macs_per_token": macs_seq / T,
        "components": {
            "macs": parts,
            "params": {"embedding": embed, "layers": layers.params, "final_norm": final_norm,
                       "head": head_params},
        },
    }


def human(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"
