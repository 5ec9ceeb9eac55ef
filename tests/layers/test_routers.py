import math

import pytest
import torch

from moelab.config import RouterConfig
from moelab.layers.base import ForwardContext
from moelab.layers.routers import finish_entropy_losses, make_router


def _router(kind="softmax_topk", E=4, k=2, d=3, **coefs):
    r = make_router(d, E, k, RouterConfig(kind=kind, **coefs))
    torch.nn.init.normal_(r.weight, std=1.0)
    return r


def test_softmax_topk_weights_and_renormalise():
    r = _router(E=5, k=2)
    x = torch.randn(2, 3, 3)
    out = r(x, ForwardContext())
    p = (x @ r.weight.t()).softmax(-1)
    top = p.topk(2, -1)
    assert torch.equal(out.idx_BTK, top.indices)
    assert torch.allclose(out.weights_BTK, top.values)
    r.cfg.renormalize = True
    assert torch.allclose(r(x, ForwardContext()).weights_BTK.sum(-1), torch.ones(2, 3))


def test_sigmoid_topk_uses_raw_scores_and_expert_dropout():
    r = make_router(3, 6, 2, RouterConfig(kind="sigmoid_topk"), expert_dropout=0.5)
    torch.nn.init.normal_(r.weight, std=1.0)
    x = torch.randn(1, 50, 3)
    r.eval()
    out = r(x, ForwardContext())
    s = torch.sigmoid(x @ r.weight.t())
    assert torch.allclose(out.weights_BTK, s.gather(-1, out.idx_BTK))
    assert torch.equal(out.idx_BTK, s.topk(2, -1).indices)
    r.train()
    torch.manual_seed(0)
    dropped = r(x, ForwardContext())
    assert not torch.equal(dropped.idx_BTK, out.idx_BTK)  # dropout changes choices in training


def test_dense_softmax_routes_to_all_experts():
    r = _router("softmax_dense", E=4, k=4)
    out = r(torch.randn(2, 5, 3), ForwardContext())
    assert out.idx_BTK.shape == (2, 5, 4)
    assert torch.allclose(out.weights_BTK.sum(-1), torch.ones(2, 5))


def _fixed(r, logits_BTE):
    """Make the router produce exactly `logits_BTE` for the identity input."""
    E, d = r.weight.shape
    with torch.no_grad():
        r.weight.copy_(torch.eye(E, d))
    return logits_BTE


def test_switch_seq_and_z_losses_by_hand():
    E, k = 3, 1
    r = make_router(3, E, k, RouterConfig(switch_coef=0.5, seq_coef=0.25, z_coef=0.1))
    x = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                      [[0.0, 0.0, 3.0], [1.0, 0.0, 0.0]]])  # B=2, T=2
    _fixed(r, x)
    ctx = ForwardContext()
    r(x, ctx)
    probs = [[[math.exp(v) / sum(math.exp(u) for u in tok) for v in tok] for tok in seq]
             for seq in x.tolist()]
    choice = [[max(range(E), key=lambda e: tok[e]) for tok in seq] for seq in probs]  # 0,1 / 2,0
    # Switch: E * sum_e f_e P_e over all 4 tokens
    f = [sum(c == e for seq in choice for c in seq) / 4 for e in range(E)]
    P = [sum(tok[e] for seq in probs for tok in seq) / 4 for e in range(E)]
    switch = E * sum(fe * pe for fe, pe in zip(f, P))
    # sequence-level: mean_b sum_e (count_b(e) * E / (T k)) * mean_t p[b, t, e]
    seq = sum(sum((sum(c == e for c in choice[b]) * E / 2) * (sum(t[e] for t in probs[b]) / 2)
                  for e in range(E)) for b in range(2)) / 2
    z = sum(math.log(sum(math.exp(v) for v in tok)) ** 2 for s in x.tolist() for tok in s) / 4
    aux = ctx.aux_losses
    assert aux["layer0.router.switch"].item() == pytest.approx(0.5 * switch, rel=1e-6)
    assert aux["layer0.router.seq"].item() == pytest.approx(0.25 * seq, rel=1e-6)
    assert aux["layer0.router.z"].item() == pytest.approx(0.1 * z, rel=1e-6)
    m = ctx.metrics
    assert torch.allclose(m["layer0.router.load"], torch.tensor(f))
    assert m["layer0.router.dead"].item() == sum(fe == 0 for fe in f)


def test_entropy_regulariser_pools_two_repeats_by_hand():
    """MoEUT: per sequence, the marginal softmax over time *and both repeats* of a shared layer."""
    E = 3
    r = make_router(3, E, 1, RouterConfig(kind="sigmoid_topk", entropy_coef=0.01))
    ctx = ForwardContext()
    x1 = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]])
    x2 = torch.tensor([[[0.0, 0.0, 1.0], [0.5, 0.5, 0.5]]])
    _fixed(r, x1)
    ctx.position = 0
    r(x1, ctx)
    ctx.position = 2  # the same module again, one group later
    r(x2, ctx)
    assert not any("entropy" in k for k in ctx.aux_losses)  # computed once the pass ends
    finish_entropy_losses(ctx)
    toks = x1[0].tolist() + x2[0].tolist()
    sm = [[math.exp(v) / sum(math.exp(u) for u in t) for v in t] for t in toks]
    marg = [sum(p[e] for p in sm) / 4 for e in range(E)]
    neg_entropy = sum(p * math.log(p) for p in marg)
    (name, val), = [(k, v) for k, v in ctx.aux_losses.items() if "entropy" in k]
    assert name == "layer0.router.entropy"
    assert val.item() == pytest.approx(0.01 * neg_entropy, rel=1e-6)


def test_losses_get_gradient_and_no_module_state():
    r = _router(switch_coef=1.0, seq_coef=1.0, z_coef=1.0)
    x = torch.randn(2, 4, 3)
    ctx1, ctx2 = ForwardContext(), ForwardContext()
    r(x, ctx1)
    r(x, ctx2)
    for k in ctx1.aux_losses:
        assert torch.equal(ctx1.aux_losses[k], ctx2.aux_losses[k])  # nothing carried over
    sum(ctx1.aux_losses.values()).backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# aux-loss-free balancing (router.bias_rate)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["softmax_topk", "sigmoid_topk"])
def test_balance_bias_moves_the_choice_not_the_gates(kind):
    r = _router(kind, E=5, k=2, bias_rate=0.1)
    x = torch.randn(4, 6, 3)
    r.balance_bias_E.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0]))  # expert 3 always chosen
    out = r(x, ForwardContext())
    logits = x @ r.weight.t()
    scores = logits.softmax(-1) if kind == "softmax_topk" else torch.sigmoid(logits)
    assert (out.idx_BTK == 3).any(-1).all()
    torch.testing.assert_close(out.weights_BTK, scores.gather(-1, out.idx_BTK))  # unbiased
    expected = (scores + r.balance_bias_E).topk(2, -1).indices
    assert torch.equal(out.idx_BTK, expected)


def test_balance_bias_update_sign_centring_and_step_loads():
    r = _router(E=4, k=1, bias_rate=0.1)
    r.train()
    r.record_load(torch.tensor([0, 0, 0, 1, 2, 2]))  # loads 3, 1, 2, 0: mean 1.5
    r.record_load(torch.tensor([3, 3]))  # a second micro-batch adds: 3, 1, 2, 2
    r.update_bias()
    torch.testing.assert_close(r.balance_bias_E, torch.tensor([-0.1, 0.1, 0.0, 0.0]))  # mean 2
    before = r.balance_bias_E.clone()
    r.update_bias()  # no training forward since: nothing to move
    assert torch.equal(r.balance_bias_E, before)
    r.eval()
    r(torch.randn(2, 3, 3), ForwardContext())  # evaluation does not count
    assert r._load_E is None
    r.train()
    r.record_load(torch.tensor([0, 1]))
    r.update_bias(all_sum=lambda t: t + torch.tensor([0.0, 0.0, 4.0, 0.0]))  # other ranks' loads
    torch.testing.assert_close(r.balance_bias_E - before,
                               torch.tensor([0.1, 0.1, -0.1, 0.1]) - 0.05)


@pytest.mark.parametrize("kind", ["softmax_topk", "sigmoid_topk"])
def test_balance_bias_evens_out_a_collapsed_router(kind):
    torch.manual_seed(0)
    r = make_router(16, 8, 2, RouterConfig(kind=kind, bias_rate=0.01))
    torch.nn.init.normal_(r.weight, std=0.3)
    x = torch.randn(8, 32, 16) + 0.5
    with torch.no_grad():  # expert 0 aligned with the mean input: chosen by nearly every token
        r.weight[0] += 2.0 * x.mean((0, 1)) / x.mean((0, 1)).norm()
    r.train()

    def imbalance():
        with torch.no_grad():
            idx = r(x, ForwardContext()).idx_BTK
        load = torch.bincount(idx.reshape(-1), minlength=8).float()
        return float(load.max() / load.mean())

    start = imbalance()
    for _ in range(100):
        r.update_bias()
        imbalance()
    assert start > 3.0 and imbalance() < 1.3
    assert abs(float(r.balance_bias_E.sum())) < 1e-4  # centred


def test_balance_bias_headwise_and_errors():
    from moelab.config import load_preset
    from moelab.errors import ConfigError
    from moelab.layers.attn_experts import HeadwiseRouter
    from moelab.model import MoELM

    hr = HeadwiseRouter(3, n_heads=2, n_experts=4, top_k=1,
                        cfg=RouterConfig(kind="sigmoid_topk", bias_rate=0.1), name="v")
    hr.router.balance_bias_E.copy_(torch.tensor([0, 0, 0, 9.0, 9.0, 0, 0, 0]))
    ctx = ForwardContext()
    idx, _ = hr(torch.randn(2, 5, 3), ctx)
    assert (idx[..., 0, 0] == 3).all() and (idx[..., 1, 0] == 4).all()  # head 1: ids 4..7
    assert hr.router._load_E.tolist() == [0, 0, 0, 10, 10, 0, 0, 0]
    assert ctx.metrics["layer0.v.bias"].shape == (8,)
    with pytest.raises(ConfigError, match="model.router.bias_rate"):
        MoELM(load_preset("mole-tiny").with_overrides(["model.router.bias_rate=0.01"]).model)
    with pytest.raises(ConfigError, match="bias_rate"):
        RouterConfig(bias_rate=-1.0).validate("model.router")


def test_balance_bias_with_expert_dropout_keeps_both():
    r = make_router(3, 6, 2, RouterConfig(kind="sigmoid_topk", bias_rate=0.1), expert_dropout=0.5)
    torch.nn.init.normal_(r.weight, std=1.0)
    r.balance_bias_E.copy_(torch.linspace(0, 2.5, 6))
    r.train()
    x = torch.randn(4, 5, 3)
    torch.manual_seed(3)
    out = r(x, ForwardContext())
    torch.manual_seed(3)
    scores = torch.sigmoid(x @ r.weight.t())
    drop = torch.rand_like(scores) < 0.5
    expected = (scores + r.balance_bias_E).masked_fill(drop, float("-inf")).topk(2, -1).indices
    assert torch.equal(out.idx_BTK, expected)
    torch.testing.assert_close(out.weights_BTK, scores.gather(-1, expected))
