"""MoELM: the one model class that builds every moelab variant from a `ModelConfig`.

A block is a token mixer (`config.attention.kind`) and a channel mixer (`config.ffn.kind`) around a
residual stream; both are looked up in registries, so the block never branches on the variant.
Layer sharing (MoEUT) is a schedule: `config.sharing.group_size` distinct blocks applied in ABAB
order; each position in the schedule has its own KV cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelab.config import ModelConfig
from moelab.errors import ConfigError
from moelab.layers.base import ForwardContext, KVCache, LayerCache
from moelab.layers.init import init_weights
from moelab.layers.norms import block_norm, make_norm
from moelab.layers.routers import finish_entropy_losses
from moelab.registry import ATTENTION, FFN


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        # Modules the token and channel mixers of this layer may share (UMoE: one expert bank
        # held by attention and FFN). The mixer built first creates them; both hold references.
        shared: dict[str, nn.Module] = {}
        self.attn_norm = block_norm(cfg)
        self.attn = ATTENTION.get(cfg.attention.kind)(cfg, layer_idx, shared=shared)
        self.ffn_norm = block_norm(cfg)
        self.ffn = FFN.get(cfg.ffn.kind)(cfg, layer_idx, shared=shared)

    def forward(self, x_BTD: torch.Tensor, cache: Optional[LayerCache], past: int,
                ctx: ForwardContext) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cache, past, ctx)
        return x_BTD + self.ffn(self.ffn_norm(x_BTD), ctx)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: Optional[torch.Tensor] = None  # LM cross-entropy (mean over target tokens)
    aux_loss: Optional[torch.Tensor] = None  # sum of balance losses, coefficients applied
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # routing statistics
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)  # per layer (L,)
    cache: Optional[KVCache] = None


class MoELM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_distinct_layers))
        self.schedule = [i % cfg.n_distinct_layers for i in range(cfg.n_layers)]
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.head_bias)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        init_weights(self, cfg)
        if cfg.pad_token_id is not None:  # zero, and padding_idx keeps its gradient zero
            with torch.no_grad():
                self.embed.weight[cfg.pad_token_id].zero_()

    def new_cache(self, capacity: Optional[int] = None) -> KVCache:
        """An empty cache; `capacity` positions (prompt + new tokens) are preallocated."""
        return KVCache(len(self.schedule), capacity)

    def forward(self, idx_BT: torch.Tensor, targets_BT: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, diagnostics: bool = False,
                stats: Optional[bool] = None, last_only: bool = False) -> ModelOutput:
        """`stats`: compute balance losses (`aux_loss`) and routing metrics; default: in
        training mode only (evaluation and `report` ask for them with stats=True).
        `last_only`: logits of the last position only, (B, 1, V) (generation's prefill)."""
        if last_only and targets_BT is not None:
            raise ValueError("last_only=True computes one position's logits; the loss over "
                             "targets_BT needs all of them")
        past = cache.seq_len if cache is not None else 0
        x_BTD = self.embed(idx_BT)
        ctx = ForwardContext(token_emb_BTD=x_BTD, diagnostics=diagnostics,
                             stats=self.training if stats is None else stats)
        for pos, layer_id in enumerate(self.schedule):
            ctx.position = pos
            layer_cache = cache.layers[pos] if cache is not None else None
            x_BTD = self.layers[layer_id](x_BTD, layer_cache, past, ctx)
            if diagnostics:
                ctx.add_diag("max_activation", x_BTD.abs().max())
        finish_entropy_losses(ctx)
        if cache is not None:
            cache.seq_len += idx_BT.shape[1]
        if last_only:
            x_BTD = x_BTD[:, -1:]
        logits_BTV = self.head(self.norm(x_BTD))
        out = ModelOutput(logits=logits_BTV, aux_losses=ctx.aux_losses, metrics=ctx.metrics,
                          cache=cache)
        out.aux_loss = (torch.stack(list(ctx.aux_losses.values())).sum()
                        if ctx.aux_losses else logits_BTV.new_zeros((), dtype=torch.float32))
        if targets_BT is not None:
            out.loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten(),
                                       ignore_index=-100)
        out.diagnostics = {k: torch.stack(v) for k, v in ctx.diag.items()}
        return out

    def generate(self, idx_BT: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Sample continuations. temperature 0 = greedy. Sequences that emit `eos_id` keep
        emitting it; generation stops early once every sequence has finished."""
        check_sampling(max_new_tokens, temperature, top_k, top_p, num_samples=idx_BT.shape[0])
        if idx_BT.ndim != 2 or idx_BT.shape[1] < 1:
            raise ConfigError(f"generate: prompt ids of shape {tuple(idx_BT.shape)}; expected "
                              "(batch, tokens) with at least one token")
        was_training = self.training
        self.eval()
        try:
            # inference mode, not just no_grad: no version counters or view tracking on the
            # few hundred small ops of a decode step
            with torch.inference_mode():
                out_BT = self._decode(idx_BT, max_new_tokens, temperature, top_k, top_p,
                                      eos_id, generator, use_cache)
        finally:
            self.train(was_training)
        return out_BT.clone()  # a normal tensor: callers may write into it or use autograd

    def _decode(self, idx_BT, max_new_tokens, temperature, top_k, top_p, eos_id, generator,
                use_cache) -> torch.Tensor:
        T0 = idx_BT.shape[1]
        cache = self.new_cache(T0 + max(max_new_tokens, 0)) if use_cache else None
        out_BT = idx_BT.new_empty(idx_BT.shape[0], T0 + max(max_new_tokens, 0))
        out_BT[:, :T0] = idx_BT
        n = T0
        step_in = idx_BT
        done_B = torch.zeros(idx_BT.shape[0], dtype=torch.bool, device=idx_BT.device)
        for _ in range(max_new_tokens):
            logits_BV = self(step_in if use_cache else out_BT[:, :n], cache=cache,
                             last_only=True).logits[:, -1].float()
            next_B = sample_next(logits_BV, temperature, top_k, top_p, generator)
            if eos_id is not None:
                next_B = torch.where(done_B, torch.full_like(next_B, eos_id), next_B)
                done_B |= next_B == eos_id
            out_BT[:, n] = next_B
            n += 1
            step_in = out_BT[:, n - 1:n]
            if eos_id is not None and bool(done_B.all()):
                break
        return out_BT[:, :n]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_sampling(max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                   top_p: Optional[float] = None, num_samples: int = 1) -> None:
    """ConfigError naming the first sampling argument outside its range (the CLI's flag names:
    `generate` and the CLI share this check, so neither accepts what the other refuses)."""
    checks = [
        ("--max-new-tokens", max_new_tokens, isinstance(max_new_tokens, int) and
         max_new_tokens >= 0, "an integer >= 0"),
        ("--temperature", temperature, math.isfinite(temperature) and temperature >= 0,
         "a number >= 0 (0 = greedy)"),
        ("--top-k", top_k, top_k is None or (isinstance(top_k, int) and top_k >= 1),
         "an integer >= 1, or unset for no top-k cut"),
        ("--top-p", top_p, top_p is None or (math.isfinite(top_p) and 0 < top_p <= 1),
         "a number in (0, 1], or unset for no nucleus cut"),
        ("--num-samples", num_samples, isinstance(num_samples, int) and num_samples >= 1,
         "an integer >= 1"),
    ]
    for flag, value, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{flag} {value}: expected {expected}")


def sample_next(logits_BV: torch.Tensor, temperature: float, top_k: Optional[int],
                top_p: Optional[float], generator: Optional[torch.Generator]) -> torch.Tensor:
    if temperature <= 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV / temperature
    if top_k:
        kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits_BV.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the mass before it already reaches top_p (always keep the first)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    probs = logits_BV.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
