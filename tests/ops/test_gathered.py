"""The gathered decode path against the float64 per-token reference, and when `auto` takes it."""
import pytest
import torch

from engine_cases import make_routing
from moelab.layers.experts import ExpertBank
from moelab.ops.gathered import gathered_expert_ffn, use_gathered
from moelab.ops.plan import build_plan
from moelab.ops.reference import per_token_expert_ffn


@pytest.mark.parametrize("T,E,k,gated,act,weighted", [
    (1, 8, 2, True, "silu", True), (3, 6, 1, False, "relu", True), (5, 4, 4, True, "gelu", False),
    (8, 16, 2, False, "silu", True)])
def test_gathered_matches_reference_outputs_and_gradients(T, E, k, gated, act, weighted):
    gen = torch.Generator().manual_seed(T + E)
    d, h = 12, 10

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)

    x, w1, w2 = rnd(T, d), rnd(E, d, h), rnd(E, h, d)
    w3 = rnd(E, d, h) if gated else None
    idx, weights = make_routing(T, E, k, seed=T)
    weights = weights.double().requires_grad_() if weighted else None
    leaves = [t for t in (x, w1, w2, w3, weights) if t is not None]
    y = gathered_expert_ffn(x, w1, w2, idx, weights, act, w3)
    ref = per_token_expert_ffn(x, w1, w2, idx, weights, act, w3)
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), leaves)
    grads_ref = torch.autograd.grad((ref * g).sum(), leaves)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_use_gathered_only_for_few_pairs_small_copies_and_no_grad():
    w = torch.randn(16, 192, 128)
    x = torch.randn(8, 192)
    assert use_gathered(x, 16, 16, w, w, w)  # batch 8, top-2 of 16: one pair per expert
    assert not use_gathered(x, 17, 16, w, w, w)  # more pairs than experts in float32
    xb, wb = x.bfloat16(), w.bfloat16()
    assert use_gathered(xb, 32, 16, wb, wb, wb)  # two per expert in bf16
    big = torch.randn(64, 512, 512)
    assert not use_gathered(torch.randn(8, 512), 64, 64, big, big)  # 128 MiB to copy
    wg = w.clone().requires_grad_()
    assert not use_gathered(x, 16, 16, wg, wg)  # training: the plan-based kernels
    with torch.no_grad():
        assert use_gathered(x, 16, 16, wg, wg)
    assert not use_gathered(x, 16, 16, w, w.double())


def test_bank_route_takes_the_decode_path_and_matches_the_plan_path(monkeypatch):
    import moelab.layers.experts as experts

    torch.manual_seed(0)
    bank = ExpertBank(16, 24, 8, activation="silu", gated=True)
    x = torch.randn(4, 24)
    idx, w = make_routing(4, 16, 2)
    with torch.no_grad():
        want = bank(x, build_plan(idx, 16), w)
        calls = []
        monkeypatch.setattr(experts, "gathered_expert_ffn",
                            lambda *a: calls.append(1) or gathered_expert_ffn(*a))
        got = bank.route(x, idx, w)
    assert calls == [1] and torch.allclose(got, want, atol=1e-6)
    y = bank.route(x, idx, w)  # with grad: the plan path, no call
    assert calls == [1] and y.requires_grad and torch.allclose(y, want, atol=1e-6)
