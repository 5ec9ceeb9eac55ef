"""expert_ffn: every backend against the reference loop; the reference against the definition."""
import pytest
import torch

from engine_cases import (BACKENDS, CASES, assert_close, assert_close_norm, make_case,
                          run_with_grads)
from moelab.errors import ConfigError
from moelab.ops import expert_ffn, expert_ffn_sorted
from moelab.ops.reference import (per_token_expert_ffn, reference_expert_ffn,
                                  reference_routed_matmul)

NAMES = ("y", "dx", "dW1", "dW2", "dweights", "dW3")


def _leaves(c):
    return [c["x"], c["w1"], c["w2"], c["weights"]] + ([c["w3"]] if c["w3"] is not None else [])


def _ffn(c, backend, act, weighted=True):
    w = c["weights"] if weighted else None
    if backend == "reference":
        return lambda: reference_expert_ffn(c["x"], c["w1"], c["w2"], c["plan"], w, act, c["w3"])
    return lambda: expert_ffn(c["x"], c["w1"], c["w2"], c["plan"], w, act, c["w3"],
                              backend=backend)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_expert_ffn_fp32(case, backend, gated):
    c = make_case(case, gated=gated)
    leaves = _leaves(c)
    want = run_with_grads(_ffn(c, "reference", "silu"), leaves, c["g"])
    got = run_with_grads(_ffn(c, backend, "silu"), leaves, c["g"])
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, 1e-5, f"{case}/{backend}/{name}")


@pytest.mark.parametrize("act", ["gelu", "relu"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_ffn_activations(backend, act):
    c = make_case("general", gated=(act == "gelu"))
    leaves = _leaves(c)
    want = run_with_grads(_ffn(c, "reference", act), leaves, c["g"])
    got = run_with_grads(_ffn(c, backend, act), leaves, c["g"])
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, 1e-5, f"{backend}/{act}/{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_ffn_unweighted(backend):
    c = make_case("general")
    leaves = [c["x"], c["w1"], c["w2"]]
    want = run_with_grads(_ffn(c, "reference", "silu", False), leaves, c["g"])
    got = run_with_grads(_ffn(c, backend, "silu", False), leaves, c["g"])
    for name, a, b in zip(NAMES, got, want):
        assert_close(a, b, 1e-5, f"{backend}/{name}")


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["general", "k1", "many_empty"])
def test_expert_ffn_bf16(case, backend, gated):
    c = make_case(case, torch.bfloat16, gated=gated)
    leaves = _leaves(c)
    got = run_with_grads(_ffn(c, backend, "silu"), leaves, c["g"])
    # float32 reference on the same bf16 values: measures this backend's own rounding error
    c32 = dict(c)
    for key in ("x", "w1", "w2", "w3"):
        if c[key] is not None:
            c32[key] = c[key].detach().float().requires_grad_()
    c32["weights"] = c["weights"].detach().clone().requires_grad_()
    want = run_with_grads(_ffn(c32, "reference", "silu"), _leaves(c32), c["g"].float())
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == (torch.float32 if name == "dweights" else torch.bfloat16), name
        assert_close_norm(a, b, 1e-2, f"{case}/{backend}/{name}")


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_is_the_definition_float64(case, gated):
    c = make_case(case, torch.float64, gated=gated)
    c["weights"] = c["weights"].double()
    want = per_token_expert_ffn(c["x"], c["w1"], c["w2"], c["idx"], c["weights"], "silu", c["w3"])
    got = reference_expert_ffn(c["x"], c["w1"], c["w2"], c["plan"], c["weights"], "silu", c["w3"])
    assert_close(got, want, 1e-12, case)


@pytest.mark.parametrize("backend", ["loop", "scatter", "padded"])
def test_backends_match_definition_float64(backend):
    # grouped_mm has no float64 kernel and must fall back cleanly to the loop.
    c = make_case("general", torch.float64, gated=True)
    c["weights"] = c["weights"].double()
    want = per_token_expert_ffn(c["x"], c["w1"], c["w2"], c["idx"], c["weights"], "gelu", c["w3"])
    got = expert_ffn(c["x"], c["w1"], c["w2"], c["plan"], c["weights"], "gelu", c["w3"],
                     backend=backend)
    assert_close(got, want, 1e-12, backend)
    got = expert_ffn(c["x"], c["w1"], c["w2"], c["plan"], c["weights"], "gelu", c["w3"],
                     backend="grouped_mm")
    assert_close(got, want, 1e-12, "grouped_mm fallback")


@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_ffn_sorted(backend):
    c = make_case("general", gated=True)
    plan = c["plan"]
    got = expert_ffn_sorted(c["x"], c["w1"], c["w2"], plan, "silu", c["w3"], backend=backend)
    h = torch.nn.functional.silu(reference_routed_matmul(c["x"], c["w1"], plan, gather=True))
    h = h * reference_routed_matmul(c["x"], c["w3"], plan, gather=True)
    want = reference_routed_matmul(h, c["w2"], plan, gather=False)
    assert_close(got, want, 1e-5, backend)
    # per-slot outputs recombine to the weighted FFN
    y_TKD = plan.unsort_pairs(got)
    combined = (y_TKD * c["weights"][..., None]).sum(1)
    ref = reference_expert_ffn(c["x"], c["w1"], c["w2"], plan, c["weights"], "silu", c["w3"])
    assert_close(combined, ref, 1e-5, backend)


def test_errors():
    c = make_case("general")
    with pytest.raises(ConfigError, match="tanh"):
        expert_ffn(c["x"], c["w1"], c["w2"], c["plan"], activation="tanh")
    with pytest.raises(ConfigError, match="'megablocks'.*loop"):
        expert_ffn(c["x"], c["w1"], c["w2"], c["plan"], backend="megablocks")
    with pytest.raises(ValueError, match="expert weights"):
        expert_ffn(c["x"], c["w1"], c["w1"], c["plan"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend):
    x = torch.randn(0, 8, requires_grad=True)
    w1 = torch.randn(4, 8, 8, requires_grad=True)
    w2 = torch.randn(4, 8, 8, requires_grad=True)
    from moelab.ops import build_plan
    plan = build_plan(torch.zeros(0, 2, dtype=torch.long), 4)
    y = expert_ffn(x, w1, w2, plan, torch.zeros(0, 2), backend=backend)
    y.sum().backward()
    assert y.shape == (0, 8) and not w1.grad.any() and not w2.grad.any()
