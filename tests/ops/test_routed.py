"""routed_matmul and combine: every backend against the plain-autograd reference."""
import pytest
import torch

from engine_cases import (BACKENDS, CASES, assert_close, assert_close_norm, make_case,
                          run_with_grads)
from moelab.ops import combine, routed_matmul
from moelab.ops.reference import reference_combine, reference_routed_matmul


def _routed(case, backend, gather, dtype):
    c = make_case(case, dtype)
    plan = c["plan"]
    gen = torch.Generator().manual_seed(7)
    x = c["x"] if gather else torch.randn(plan.n_pairs, c["x"].shape[1], generator=gen).to(dtype)
    x.requires_grad_()
    g = torch.randn(plan.n_pairs, c["w1"].shape[2], generator=gen).to(dtype)
    leaves = [x, c["w1"]]
    if backend == "reference":
        fn = lambda: reference_routed_matmul(x, c["w1"], plan, gather=gather)  # noqa: E731
    else:
        fn = lambda: routed_matmul(x, c["w1"], plan, gather=gather, backend=backend)  # noqa
    return run_with_grads(fn, leaves, g), (x, c["w1"], plan, g)


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_routed_matmul_fp32(case, backend, gather):
    want, _ = _routed(case, "reference", gather, torch.float32)
    got, _ = _routed(case, backend, gather, torch.float32)
    for name, a, b in zip(("y", "dx", "dW"), got, want):
        assert_close(a, b, 1e-5, f"{case}/{backend}/{name}")


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["general", "k_equals_E", "many_empty"])
def test_routed_matmul_bf16(case, backend, gather):
    got, (x, w, plan, g) = _routed(case, backend, gather, torch.bfloat16)
    # bf16 result vs the float32 reference on the very same (bf16-representable) values
    x32 = x.detach().float().requires_grad_()
    w32 = w.detach().float().requires_grad_()
    want = run_with_grads(lambda: reference_routed_matmul(x32, w32, plan, gather=gather),
                          [x32, w32], g.float())
    for name, a, b in zip(("y", "dx", "dW"), got, want):
        assert a.dtype == torch.bfloat16
        assert_close_norm(a, b, 1e-2, f"{case}/{backend}/{name}")


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_combine(case, weighted):
    c = make_case(case)
    plan = c["plan"]
    y = torch.randn(plan.n_pairs, 8, requires_grad=True)
    g = torch.randn(plan.n_tokens, 8)
    w = c["weights"] if weighted else None
    leaves = [y] + ([w] if weighted else [])
    got = run_with_grads(lambda: combine(y, plan, w), leaves, g)
    want = run_with_grads(lambda: reference_combine(y, plan, w), leaves, g)
    for a, b in zip(got, want):
        assert_close(a, b, 1e-6, case)


def test_combine_unweighted_sums_slots():
    idx = torch.tensor([[0, 1], [1, 0]])
    from moelab.ops import build_plan
    plan = build_plan(idx, 2)
    y_TKD = torch.arange(8.0).view(2, 2, 2)
    out = combine(plan.sort_pairs(y_TKD), plan)
    assert torch.equal(out, y_TKD.sum(1))


def test_shape_errors():
    c = make_case("general")
    with pytest.raises(ValueError, match="x must be"):
        routed_matmul(c["x"], c["w1"], c["plan"], gather=False)
    with pytest.raises(ValueError, match="expert weight"):
        routed_matmul(c["x"], c["w1"][:2], c["plan"], gather=True)
    with pytest.raises(ValueError, match="sorted rows"):
        combine(c["x"], c["plan"])
