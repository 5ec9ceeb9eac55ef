"""Shared cases and comparisons for the engine tests."""
from __future__ import annotations

import importlib.util

import torch

from moelab.ops import build_plan

# `triton` runs in Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1
# when there is no GPU); without the triton package it is left out.
BACKENDS = ("loop", "scatter", "grouped_mm", "padded", "auto") + (
    ("triton",) if importlib.util.find_spec("triton") is not None else ())

# (T, E, k, d, h, empty): T tokens, E experts, top-k, widths, experts forced to get no token.
# d and h are multiples of 8 so grouped_mm really runs (its rows must be 16-byte aligned).
CASES = {
    "general": (37, 6, 3, 16, 24, (2,)),
    "k1": (13, 5, 1, 8, 16, (0, 4)),
    "k_equals_E": (9, 4, 4, 16, 8, ()),
    "one_token": (1, 7, 2, 8, 16, ()),
    "many_empty": (29, 12, 2, 24, 16, (1, 3, 5, 7, 9, 11)),
}


def make_routing(T, E, k, empty=(), seed=0):
    """Top-k of a softmax over random logits; experts in `empty` never win."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen)
    if empty:
        logits[:, list(empty)] = -1e4
    weights, idx = logits.softmax(-1).topk(k, dim=-1)
    if len(empty) > E - k:
        raise ValueError("too many empty experts for top-k")
    return idx, weights


def make_case(name, dtype=torch.float32, gated=False, seed=0):
    T, E, k, d, h, empty = CASES[name]
    gen = torch.Generator().manual_seed(seed + 1)
    idx, weights = make_routing(T, E, k, empty, seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_()

    x = rnd(T, d)
    w1 = rnd(E, d, h, scale=d ** -0.5)
    w2 = rnd(E, h, d, scale=h ** -0.5)
    w3 = rnd(E, d, h, scale=d ** -0.5) if gated else None
    g = torch.randn(T, d, generator=gen).to(dtype)
    return dict(x=x, w1=w1, w2=w2, w3=w3, weights=weights.clone().requires_grad_(), idx=idx,
                g=g, plan=build_plan(idx, E), E=E)


def run_with_grads(fn, leaves, g):
    """Output and the gradients of every leaf (None where the leaf got none)."""
    for t in leaves:
        t.grad = None
    y = fn()
    y.backward(g)
    return [y.detach()] + [None if t.grad is None else t.grad.detach().clone() for t in leaves]


def assert_close(got, want, rel, what=""):
    """max|got - want| <= rel * max|want| (float32), scale-free and strict enough for fp32."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    assert err <= rel * max(scale, 1e-6), f"{what}: max err {err:.3e} vs scale {scale:.3e}"


def assert_close_norm(got, want, rel, what=""):
    """||got - want|| <= rel * ||want|| (bf16: elementwise error is not meaningful near zero)."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = (got.double() - want.double()).norm().item()
    scale = want.double().norm().item()
    assert err <= rel * max(scale, 1e-6), f"{what}: rel err {err / max(scale, 1e-12):.3e}"
