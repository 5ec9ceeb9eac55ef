"""Normalisation layers and the norm scheme (pre-LN or MoEUT's peri-LN)."""
from __future__ import annotations

import torch.nn as nn

from moelab.config import ModelConfig
from moelab.registry import NORM


@NORM.register("rmsnorm")
def rms_norm(dim: int, eps: float) -> nn.Module:
    return nn.RMSNorm(dim, eps=eps)


@NORM.register("layernorm")
def layer_norm(dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    """A norm of the configured kind over `dim` (default d_model)."""
    return NORM.get(cfg.norm.kind)(dim or cfg.d_model, cfg.norm.eps)


def block_norm(cfg: ModelConfig) -> nn.Module:
    """The norm in front of a sub-layer on the residual stream.

    Pre-LN normalises the whole sub-layer input. Peri-LN (MoEUT) leaves the residual input raw and
    lets each mixer norm only the inputs of the maps that feed a softmax or sigmoid, so the block
    gets an identity here and the layers apply their own norms (`cfg.norm.scheme == "peri"`).
    """
    return nn.Identity() if cfg.norm.scheme == "peri" else make_norm(cfg)
