"""ExpertBank: parameters, forward against the reference, sorted outputs, sharing, counts."""
import pytest
import torch
import torch.nn as nn

from moelab.errors import ConfigError
from moelab.layers.experts import ExpertBank
from moelab.ops import build_plan
from moelab.ops.reference import per_token_expert_ffn, reference_expert_ffn


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops; see tests/ops/conftest.py
    yield
    torch.set_num_threads(before)


def _routing(T, E, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w, idx = torch.randn(T, E, generator=gen).softmax(-1).topk(k, -1)
    return idx, w


@pytest.mark.parametrize("gated", [False, True])
def test_parameters_and_init(gated):
    bank = ExpertBank(64, 32, 16, gated=gated)
    assert bank.w1_EDH.shape == (64, 32, 16) and bank.w2_EHD.shape == (64, 16, 32)
    assert (bank.w3_EDH is not None) == gated
    n = sum(p.numel() for p in bank.parameters())
    assert n == ExpertBank.expert_params(64, 32, 16, gated)
    assert abs(bank.w1_EDH.std().item() - 0.02) < 0.002
    assert "n_experts=64" in repr(bank)


@pytest.mark.parametrize("backend", ["auto", "loop", "scatter", "grouped_mm", "padded"])
@pytest.mark.parametrize("gated,act", [(False, "silu"), (True, "silu"), (False, "gelu"),
                                       (True, "relu")])
def test_forward_matches_reference(gated, act, backend):
    torch.manual_seed(0)
    bank = ExpertBank(6, 16, 24, activation=act, gated=gated, backend=backend, init_std=0.3)
    idx, w = _routing(11, 6, 2)
    x = torch.randn(11, 16)
    plan = build_plan(idx, 6)
    y = bank(x, plan, w)
    want = reference_expert_ffn(x, bank.w1_EDH, bank.w2_EHD, plan, w, act, bank.w3_EDH)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


def test_forward_float64_is_the_definition():
    bank = ExpertBank(5, 8, 8, gated=True, init_std=0.5).double()
    idx, w = _routing(7, 5, 3)
    x = torch.randn(7, 8, dtype=torch.float64)
    y = bank(x, build_plan(idx, 5), w.double())
    want = per_token_expert_ffn(x, bank.w1_EDH, bank.w2_EHD, idx, w.double(), "silu",
                                bank.w3_EDH)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_batched_input_shape_and_grads():
    bank = ExpertBank(4, 8, 16)
    x = torch.randn(2, 5, 8, requires_grad=True)
    idx, w = _routing(10, 4, 2)
    w.requires_grad_()
    y = bank(x, build_plan(idx.view(2, 5, 2), 4), w.view(2, 5, 2))
    assert y.shape == x.shape
    y.square().sum().backward()
    for t in (x, w, bank.w1_EDH, bank.w2_EHD):
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_forward_sorted_recombines():
    bank = ExpertBank(6, 16, 8, gated=True, init_std=0.3)
    idx, w = _routing(9, 6, 3)
    x = torch.randn(9, 16)
    plan = build_plan(idx, 6)
    y_SD = bank.forward_sorted(x, plan)
    assert y_SD.shape == (27, 16)
    recombined = (plan.unsort_pairs(y_SD) * w[..., None]).sum(1)
    torch.testing.assert_close(recombined, bank(x, plan, w), rtol=1e-5, atol=1e-6)


def test_bf16_forward_backward():
    bank = ExpertBank(8, 16, 8).to(torch.bfloat16)
    idx, w = _routing(33, 8, 2)
    x = torch.randn(33, 16, dtype=torch.bfloat16, requires_grad=True)
    y = bank(x, build_plan(idx, 8), w)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert bank.w1_EDH.grad.dtype == torch.bfloat16


def test_shared_bank_counts_once_and_accumulates_grads():
    bank = ExpertBank(4, 8, 8, init_std=0.3)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = bank

    model = nn.ModuleList([Layer(), Layer()])
    assert sum(p.numel() for p in model.parameters()) == ExpertBank.expert_params(4, 8, 8)
    x = torch.randn(6, 8)
    idx, w = _routing(6, 4, 2)
    plan = build_plan(idx, 4)
    model[0].experts(x, plan, w).sum().backward()
    g1 = bank.w1_EDH.grad.clone()
    model[1].experts(x, plan, w).sum().backward()
    torch.testing.assert_close(bank.w1_EDH.grad, 2 * g1)


def test_counts():
    T, k, d, h = 10, 2, 16, 8
    assert ExpertBank.expert_macs(T, k, d, h) == T * k * (d * h + h * d)
    assert ExpertBank.expert_macs(T, k, d, h, gated=True) == T * k * (2 * d * h + h * d)
    bank = ExpertBank(6, d, h, gated=True)
    assert bank.flops(T, k) == 2 * bank.macs(T, k) == 2 * T * k * 3 * d * h
    c = ExpertBank.count(6, d, h, T, k, gated=True)
    assert (c.params, c.active_params, c.macs) == (6 * 3 * d * h, 2 * 3 * d * h, T * k * 3 * d * h)


def test_errors():
    with pytest.raises(ConfigError, match="tanh"):
        ExpertBank(4, 8, 8, activation="tanh")
    with pytest.raises(ConfigError, match="'cutlass'"):
        ExpertBank(4, 8, 8, backend="cutlass")
    bank = ExpertBank(4, 8, 8)
    with pytest.raises(ValueError, match="tokens"):
        bank(torch.randn(3, 8), build_plan(torch.zeros(4, 1, dtype=torch.long), 4))
    with pytest.raises(ValueError, match="experts"):
        bank(torch.randn(4, 8), build_plan(torch.zeros(4, 1, dtype=torch.long), 5))
