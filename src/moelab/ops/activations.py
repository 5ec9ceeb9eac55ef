"""Expert activations with explicit backward, for the fused kernels that recompute instead of
letting autograd save every intermediate.

The backward formulas are ATen's own fused kernels (`silu_backward`, `gelu_backward`,
`threshold_backward`), the same ones autograd calls for `F.silu`/`F.gelu`/`F.relu`, so the fused
paths match the composed paths bit-for-bit on the activation.

The `*_into` variants write into a caller-owned buffer: the fused kernels reuse one per-op buffer
across experts instead of allocating a fresh (n, h) tensor per expert (on CPU a fresh buffer of
this size costs about as much as the elementwise op itself).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moelab.errors import ConfigError

ACTIVATIONS = ("silu", "gelu", "relu")
_aten = torch.ops.aten


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ConfigError(f"expert activation {name!r} is not one of {', '.join(ACTIVATIONS)}")
    return name


def act_forward(name: str, h: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "relu":
        return F.relu(h)
    raise ConfigError(f"expert activation {name!r} is not one of {', '.join(ACTIVATIONS)}")


def act_backward(name: str, grad_a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """d loss / d h given d loss / d act(h) and the pre-activation h."""
    if name == "silu":
        return _aten.silu_backward(grad_a, h)
    if name == "gelu":
        return _aten.gelu_backward(grad_a, h, approximate="none")
    if name == "relu":
        return _aten.threshold_backward(grad_a, h, 0)
    raise ConfigError(f"expert activation {name!r} is not one of {', '.join(ACTIVATIONS)}")


def act_forward_into(name: str, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return _aten.silu.out(h, out=out)
    if name == "gelu":
        return _aten.gelu.out(h, approximate="none", out=out)
    if name == "relu":
        return torch.clamp_min(h, 0, out=out)
    raise ConfigError(f"expert activation {name!r} is not one of {', '.join(ACTIVATIONS)}")


def act_backward_into(name: str, grad_a: torch.Tensor, h: torch.Tensor,
                      out: torch.Tensor) -> torch.Tensor:
    """Like `act_backward`; `out` may be `grad_a` itself (same layout, elementwise)."""
    if name == "silu":
        return _aten.silu_backward.grad_input(grad_a, h, grad_input=out)
    if name == "gelu":
        return _aten.gelu_backward.grad_input(grad_a, h, approximate="none", grad_input=out)
    if name == "relu":
        return _aten.threshold_backward.grad_input(grad_a, h, 0, grad_input=out)
    raise ConfigError(f"expert activation {name!r} is not one of {', '.join(ACTIVATIONS)}")
