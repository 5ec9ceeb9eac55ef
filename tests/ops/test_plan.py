import pytest
import torch

from moelab.ops import RoutingPlan, build_plan


@pytest.mark.parametrize("T,E,k", [(1, 1, 1), (1, 5, 3), (37, 6, 3), (100, 64, 8), (9, 4, 4)])
def test_plan_invariants(T, E, k):
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    plan = build_plan(idx, E)
    S = T * k
    assert isinstance(plan, RoutingPlan)
    assert (plan.n_tokens, plan.top_k, plan.n_pairs, plan.n_experts) == (T, k, S, E)
    assert plan.offsets_E1.shape == (E + 1,) and plan.offsets_E1[0] == 0
    assert plan.offsets_E1[-1] == S
    assert sum(plan.counts()) == S
    assert plan.counts() == torch.bincount(idx.reshape(-1), minlength=E).tolist()
    flat = idx.reshape(-1)
    # order sorts by expert; rows are the token of each sorted pair; inverse inverts order
    assert torch.equal(flat[plan.order_S], plan.expert_S)
    assert bool((plan.expert_S[1:] >= plan.expert_S[:-1]).all())
    assert torch.equal(plan.rows_S, plan.order_S // k)
    assert torch.equal(plan.order_S[plan.inverse_S], torch.arange(S))
    assert torch.equal(plan.inverse_S[plan.order_S], torch.arange(S))
    for e in range(E):
        lo, hi = plan.offsets_E1[e].item(), plan.offsets_E1[e + 1].item()
        assert bool((plan.expert_S[lo:hi] == e).all())
        # stable: inside an expert the pairs keep token order
        assert bool((plan.order_S[lo:hi].diff() > 0).all())
    assert plan.offsets_i32().dtype == torch.int32
    assert plan.offsets_i32().tolist() == plan.offsets_E1[1:].tolist()


def test_sort_unsort_roundtrip():
    idx = torch.tensor([[2, 0], [1, 2], [2, 1]])
    plan = build_plan(idx, 3)
    assert plan.counts() == [1, 2, 3]
    v = torch.arange(6.0).view(3, 2)
    s = plan.sort_pairs(v)
    assert s.tolist() == [1.0, 2.0, 5.0, 0.0, 3.0, 4.0]
    assert torch.equal(plan.unsort_pairs(s), v)


def test_plan_accepts_leading_dims_and_1d():
    idx = torch.randint(0, 4, (2, 5, 3))
    assert build_plan(idx, 4).n_tokens == 10
    assert build_plan(torch.tensor([3, 0, 3]), 4).counts() == [1, 0, 0, 2]


def test_plan_rejects_bad_indices():
    with pytest.raises(ValueError, match="out of range"):
        build_plan(torch.tensor([[0, 4]]), 4)
    with pytest.raises(TypeError):
        build_plan(torch.tensor([[0.0, 1.0]]), 4)


def test_counts_are_lazy_off_cpu_semantics():
    # On CPU the host counts come free with the build; the property must agree with the tensor.
    plan = build_plan(torch.tensor([[1], [1], [0]]), 3)
    assert plan.counts_E.tolist() == plan.counts() == [1, 2, 0]
    plan._counts = None
    assert plan.counts() == [1, 2, 0] and plan.max_count() == 2


def _capacity_by_hand(idx_TK, E, capacity, priority_TK=None):
    """Walk the pairs in token order (or by priority, highest first), counting per expert."""
    T, k = idx_TK.shape
    pairs = [(t, j) for t in range(T) for j in range(k)]
    if priority_TK is not None:  # stable: equal priorities keep token order
        pairs.sort(key=lambda tj: -float(priority_TK[tj]))
    used, keep = [0] * E, torch.zeros(T, k, dtype=torch.bool)
    for t, j in pairs:
        e = int(idx_TK[t, j])
        if used[e] < capacity:
            keep[t, j], used[e] = True, used[e] + 1
    return keep


@pytest.mark.parametrize("capacity", [0, 1, 3, 100])
@pytest.mark.parametrize("by_priority", [False, True])
def test_within_capacity_matches_a_walk_over_the_pairs(capacity, by_priority):
    from moelab.ops.plan import within_capacity

    torch.manual_seed(capacity)
    T, E, k = 23, 5, 2
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    idx[:9, 0] = 1  # an over-subscribed expert
    priority = torch.rand(T, k) if by_priority else None
    if by_priority:
        priority[3:6] = 0.5  # ties keep token order
    got = within_capacity(build_plan(idx, E), capacity, priority)
    assert torch.equal(got, _capacity_by_hand(idx, E, capacity, priority))
    counts = torch.bincount(idx[got], minlength=E)
    assert int(counts.max()) <= capacity


def test_regrouped_plan_combines_each_group_of_slots():
    from moelab.ops import combine

    torch.manual_seed(0)
    T, H, k, E = 5, 3, 2, 7
    idx = torch.randint(0, E, (T, H * k))
    plan = build_plan(idx, E)
    y_S = torch.randn(plan.n_pairs, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, H * k, dtype=torch.float64, requires_grad=True)
    got = combine(y_S, plan.regrouped(k), w.reshape(T * H, k))
    want = (plan.unsort_pairs(y_S) * w[..., None]).view(T, H, k, 4).sum(2).reshape(T * H, 4)
    assert torch.allclose(got, want)
    g = torch.randn_like(got)
    assert all(torch.allclose(a, b) for a, b in zip(torch.autograd.grad((got * g).sum(), (y_S, w)),
                                                    torch.autograd.grad((want * g).sum(), (y_S, w))))
    with pytest.raises(ValueError, match="groups of 4"):
        plan.regrouped(4)
