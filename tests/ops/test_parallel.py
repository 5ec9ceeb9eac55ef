"""Expert-parallel worker threads: same results as the sequential loop, threads restored."""
import pytest
import torch

from engine_cases import CASES, assert_close, make_case, run_with_grads
from moelab.ops import expert_ffn, routed_matmul
from moelab.ops import parallel
from moelab.ops.reference import reference_expert_ffn, reference_routed_matmul


@pytest.fixture
def two_workers(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_PAIRS_PER_WORKER", 1)
    parallel.set_expert_threads(2)
    yield
    parallel.set_expert_threads(None)


def test_split_experts_balanced_and_complete():
    counts = [5, 0, 7, 1, 9, 0, 3, 3]
    for parts in (1, 2, 3, 8):
        ranges = parallel.split_experts(counts, parts)
        flat = [t for r in ranges for t in r]
        assert [e for e, _, _ in flat] == [e for e, n in enumerate(counts) if n]
        assert all(n == counts[e] for e, _, n in flat)
        offsets = [sum(counts[:e]) for e, _, _ in flat]
        assert [o for _, o, _ in flat] == offsets
        assert len(ranges) <= parts
    assert parallel.split_experts([0, 0], 2) == []


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_parallel_expert_ffn_matches_reference(two_workers, case, gated):
    c = make_case(case, gated=gated)
    leaves = [c["x"], c["w1"], c["w2"], c["weights"]] + ([c["w3"]] if gated else [])
    want = run_with_grads(lambda: reference_expert_ffn(
        c["x"], c["w1"], c["w2"], c["plan"], c["weights"], "silu", c["w3"]), leaves, c["g"])
    threads = torch.get_num_threads()
    got = run_with_grads(lambda: expert_ffn(
        c["x"], c["w1"], c["w2"], c["plan"], c["weights"], "silu", c["w3"],
        backend="scatter"), leaves, c["g"])
    assert torch.get_num_threads() == threads
    for a, b in zip(got, want):
        assert_close(a, b, 1e-5, case)


@pytest.mark.parametrize("gather", [True, False])
def test_parallel_routed_matmul_matches_reference(two_workers, gather):
    c = make_case("many_empty")
    plan = c["plan"]
    x = c["x"] if gather else torch.randn(plan.n_pairs, c["x"].shape[1], requires_grad=True)
    g = torch.randn(plan.n_pairs, c["w1"].shape[2])
    want = run_with_grads(lambda: reference_routed_matmul(x, c["w1"], plan, gather=gather),
                          [x, c["w1"]], g)
    got = run_with_grads(lambda: routed_matmul(x, c["w1"], plan, gather=gather,
                                               backend="scatter"), [x, c["w1"]], g)
    for a, b in zip(got, want):
        assert_close(a, b, 1e-5)


def test_worker_errors_propagate_and_restore_threads(two_workers):
    threads = torch.get_num_threads()

    def boom(_):
        raise RuntimeError("expert failed")

    with pytest.raises(RuntimeError, match="expert failed"):
        parallel.run_experts(boom, [3, 4], torch.device("cpu"))
    assert torch.get_num_threads() == threads


@pytest.fixture
def force_buckets(monkeypatch):
    """Bucketed (padded-row) layouts in float32, so they are checked at fp32 tolerance."""
    from moelab.ops import layout
    monkeypatch.setattr(layout, "bucketing_pays", lambda x: True)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("gated,weighted", [(False, True), (True, True), (False, False)])
@pytest.mark.parametrize("case", list(CASES))
def test_bucketed_expert_ffn_matches_reference(force_buckets, monkeypatch, case, gated,
                                               weighted, workers):
    monkeypatch.setattr(parallel, "MIN_PAIRS_PER_WORKER", 1)
    parallel.set_expert_threads(workers)
    try:
        c = make_case(case, gated=gated)
        w = c["weights"] if weighted else None
        leaves = [c["x"], c["w1"], c["w2"]] + ([w] if weighted else []) + \
            ([c["w3"]] if gated else [])
        want = run_with_grads(lambda: reference_expert_ffn(
            c["x"], c["w1"], c["w2"], c["plan"], w, "gelu", c["w3"]), leaves, c["g"])
        got = run_with_grads(lambda: expert_ffn(
            c["x"], c["w1"], c["w2"], c["plan"], w, "gelu", c["w3"], backend="scatter"),
            leaves, c["g"])
    finally:
        parallel.set_expert_threads(None)
    for a, b in zip(got, want):
        assert_close(a, b, 1e-5, case)


@pytest.mark.parametrize("backend", ["scatter", "padded"])
@pytest.mark.parametrize("gather", [True, False])
def test_bucketed_routed_matmul_matches_reference(force_buckets, two_workers, gather, backend):
    c = make_case("many_empty")
    plan = c["plan"]
    x = c["x"] if gather else torch.randn(plan.n_pairs, c["x"].shape[1], requires_grad=True)
    g = torch.randn(plan.n_pairs, c["w1"].shape[2])
    want = run_with_grads(lambda: reference_routed_matmul(x, c["w1"], plan, gather=gather),
                          [x, c["w1"]], g)
    got = run_with_grads(lambda: routed_matmul(x, c["w1"], plan, gather=gather,
                                               backend=backend), [x, c["w1"]], g)
    for a, b in zip(got, want):
        assert_close(a, b, 1e-5)


def test_bucket_rows_and_layout():
    from moelab.ops import build_plan
    from moelab.ops.plan import bucket_rows
    assert [bucket_rows(n) for n in (0, 1, 3, 64, 65, 1000)] == [0, 1, 4, 64, 128, 1024]
    plan = build_plan(torch.tensor([[0, 1], [1, 2], [1, 0]]), 4)
    lay = plan.bucketed()
    assert lay.counts == [2, 4, 1, 0] and lay.n_rows == 7
    assert lay.rows_P.tolist() == [0, 2, 0, 1, 2, 0, 1]
    assert torch.equal(lay.rows_P[lay.pos_S], plan.rows_S)
    assert torch.equal(lay.pos_S[plan.inverse_TK], lay.inverse_TK)
