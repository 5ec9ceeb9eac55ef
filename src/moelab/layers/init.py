"""Weight initialisation schemes, chosen by `config.model.init.scheme`.

- `normal`: every matrix and the embedding N(0, std); biases 0; norm weights 1.
- `depth_scaled`: as normal, but parameters that write into the residual stream (tagged with
  `mark_residual_out`) get std / sqrt(2 n_layers) (GPT-2).
- `moeut`: MoEUT's scheme (reference sec. 1.5): with s = sqrt(2 / n_layers) over *all* repeats,
  each matrix is N(0, s / sqrt(fan_in)) — fan_in is the input width, or the value a module tagged
  with `set_fan_in` (σ-MoE's output experts use E x expert_dim); router rows are renormalised to
  a common norm while keeping the global std (σ-MoE), attention routers optionally as the
  official SwitchHead code does (`init.attn_router_renorm: switchhead`); the embedding is
  N(0, 1/sqrt(d)) and an untied head keeps PyTorch's default init (bias included).
- `init.router: kaiming_uniform` (normal and depth_scaled): router matrices keep nn.Linear's
  default init instead of N(0, std), as UMoE's official MoEGate does.
Parameters tagged `keep_init` are left alone by every scheme.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from moelab.config import ModelConfig

INIT_SCHEMES = {}


def register(name):
    def deco(fn):
        INIT_SCHEMES[name] = fn
        return fn
    return deco


def set_fan_in(param: nn.Parameter, fan_in: int) -> None:
    param._moelab_fan_in = fan_in  # type: ignore[attr-defined]


def _skipped(model: nn.Module) -> set[int]:
    """Norm parameters (weight 1, bias 0 from their own init) and `keep_init` parameters."""
    ids = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))
           for p in m.parameters()}
    ids |= {id(p) for p in model.parameters() if getattr(p, "_moelab_keep_init", False)}
    return ids


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    INIT_SCHEMES[cfg.init.scheme](model, cfg)


def _router_weights(model: nn.Module, attention: bool | None = None) -> set[int]:
    """ids of the router matrices (attention=True/False: only those inside / outside attention)."""
    from moelab.layers.routers import Router

    return {id(m.weight) for name, m in model.named_modules() if isinstance(m, Router)
            and (attention is None or (".attn." in f".{name}.") == attention)}


def _normal_init(model: nn.Module, std: float, out_std: float, router: str = "normal") -> None:
    skip = _skipped(model)
    routers = _router_weights(model) if router == "kaiming_uniform" else set()
    for name, p in model.named_parameters():
        if id(p) in skip:
            continue
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif id(p) in routers:  # nn.Linear's default, which UMoE's official routers keep
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        else:
            nn.init.normal_(p, std=out_std if getattr(p, "_moelab_residual_out", False) else std)


@register("normal")
def normal_init(model, cfg):
    _normal_init(model, cfg.init.std, cfg.init.std, cfg.init.router)


@register("depth_scaled")
def depth_scaled_init(model, cfg):
    _normal_init(model, cfg.init.std, cfg.init.std / math.sqrt(2 * cfg.n_layers), cfg.init.router)


def switchhead_renorm_(w: torch.Tensor) -> torch.Tensor:
    """The official SwitchHead router init (`renorm_rows`): row r becomes x_r / |x_r| * std(x_r),
    then the whole matrix is divided by one number (the std of the row-normalised matrix). The
    rows keep their spread of norms, unlike σ-MoE's rule, which makes every row's norm equal."""
    std_R1 = w.std(dim=-1, keepdim=True)
    w.div_(w.norm(dim=-1, keepdim=True))
    return w.mul_(std_R1 / w.std())


@register("moeut")
def moeut_init(model, cfg):
    scale = math.sqrt(2.0 / cfg.n_layers)
    skip = _skipped(model)
    routers = _router_weights(model)
    switchhead = (_router_weights(model, attention=True)
                  if cfg.init.attn_router_renorm == "switchhead" else set())
    special = {id(model.embed.weight)}
    if not cfg.tie_embeddings:
        special.add(id(model.head.weight))  # keeps nn.Linear's default init (and its bias)
        if model.head.bias is not None:
            special.add(id(model.head.bias))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in skip or id(p) in special:
                continue
            if name.endswith("bias"):
                p.zero_()
                continue
            fan_in = getattr(p, "_moelab_fan_in", p.shape[-1] if p.dim() == 2 else p.shape[-2])
            std = scale / math.sqrt(fan_in)
            p.normal_(0.0, std)
            if id(p) in switchhead:
                switchhead_renorm_(p)
            elif id(p) in routers:  # σ-MoE: rows to one common norm, global std unchanged
                p.mul_(std * math.sqrt(p.shape[-1]) / p.norm(dim=-1, keepdim=True))
        model.embed.weight.normal_(0.0, 1.0 / math.sqrt(cfg.d_model))
