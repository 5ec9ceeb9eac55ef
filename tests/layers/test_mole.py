"""MoLE training form (`ffn.kind: mole`) and the lookup form's layer (`mole_lookup`)."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import tiny
from moelab.config import load_preset
from moelab.flops import count
from moelab.layers.base import ForwardContext
from moelab.layers.mole import MoLEFFN, MoLELookupFFN
from moelab.model import MoELM

MOLE = ["model.ffn.kind=mole", "model.ffn.n_experts=3", "model.ffn.top_k=3",
        "model.ffn.expert_dim=16", "model.ffn.gated=false", "model.ffn.activation=gelu",
        "model.router.kind=softmax_dense"]


def _big(m, scale=6.0):
    with torch.no_grad():  # larger weights than the 0.02 init: routing far from uniform
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
    return m


def _reference(layer: MoLEFFN, x_BTD, e_BTD):
    """MoLE eq. 4-5 written out: a loop over tokens and every expert."""
    bank = layer.experts
    g = torch.softmax(layer.router_norm(x_BTD).float() @ layer.router.weight.float().t(), -1)
    en = layer.expert_norm(e_BTD)
    out = torch.zeros_like(x_BTD)
    B, T, _ = x_BTD.shape
    for b in range(B):
        for t in range(T):
            for j in range(layer.n_experts):
                h = F.gelu(en[b, t] @ bank.w1_EDH[j]) @ bank.w2_EHD[j]
                out[b, t] += g[b, t, j].to(x_BTD.dtype) * h
    return out + layer.shared(x_BTD, ForwardContext())


@pytest.mark.parametrize("extra", [[], ["model.norm.scheme=peri"], ["model.moe_backend=loop"]],
                         ids=["pre", "peri", "loop_backend"])
def test_mole_ffn_matches_explicit_equation_outputs_and_grads(extra):
    cfg = tiny(*MOLE, *extra).model
    layer = MoLEFFN(cfg, 0).double().eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, cfg.d_model, dtype=torch.float64, requires_grad=True)
    e = torch.randn(2, 5, cfg.d_model, dtype=torch.float64, requires_grad=True)
    y = layer(x, ForwardContext(token_emb_BTD=e))
    xr, er = (t.detach().clone().requires_grad_(True) for t in (x, e))
    y_ref = _reference(layer, xr, er)
    assert torch.allclose(y, y_ref, atol=1e-10)
    g = torch.randn_like(y)
    params = list(layer.parameters())
    grads = torch.autograd.grad(y, [x, e] + params, g)
    grads_ref = torch.autograd.grad(y_ref, [xr, er] + params, g)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-9)


def test_every_token_uses_every_expert_with_softmax_gates_and_no_aux_loss():
    assert load_preset("mole-tiny").model.ffn.kind == "mole"
    m = MoELM(tiny(*MOLE).model)
    out = m(torch.randint(0, 97, (2, 7)), torch.randint(0, 97, (2, 7)))
    assert out.aux_losses == {}  # LM loss only by default (MoLE Table 4)
    load = out.metrics["layer0.mole_router.load"]
    assert torch.allclose(load, torch.full((3,), 1 / 3))  # all N experts, every token
    out.loss.backward()
    ffn = m.layers[0].ffn
    for p in (ffn.router.weight, ffn.experts.w1_EDH, ffn.experts.w2_EHD, ffn.expert_norm.weight,
              m.embed.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_experts_read_the_embedding_not_the_hidden_state():
    cfg = tiny(*MOLE).model
    layer = MoLEFFN(cfg, 0).eval()
    x, e = torch.randn(1, 4, cfg.d_model), torch.randn(1, 4, cfg.d_model)
    with torch.no_grad():
        layer.shared.down.weight.zero_()
        layer.router.weight.zero_()  # uniform gates: y depends on x only through the router
        y1 = layer(x, ForwardContext(token_emb_BTD=e))
        y2 = layer(torch.randn_like(x), ForwardContext(token_emb_BTD=e))
        y3 = layer(x, ForwardContext(token_emb_BTD=e * 3))  # RMSNorm_l: scale-invariant input
    assert torch.allclose(y1, y2) and torch.allclose(y1, y3, atol=1e-5)


def _lm(sets=()):
    torch.manual_seed(0)
    return _big(MoELM(tiny(*MOLE, *sets).model).eval())


@pytest.mark.parametrize("sets", [[], ["model.sharing.group_size=1"]], ids=["distinct", "shared"])
def test_causality_and_cached_decoding(sets):
    m = _lm(sets)
    x = torch.randint(0, 97, (2, 15))
    full = m(x).logits
    for t in (0, 6):
        y = x.clone()
        y[:, t + 1] = (y[:, t + 1] + 1 + torch.arange(2)) % 97
        out = m(y).logits
        assert torch.equal(out[:, : t + 1], full[:, : t + 1])
        assert not torch.allclose(out[:, t + 1], full[:, t + 1])
    cache = m.new_cache()
    parts = [m(x[:, :6], cache=cache).logits, m(x[:, 6:10], cache=cache).logits]
    parts += [m(x[:, t:t + 1], cache=cache).logits for t in range(10, 15)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


def _flops(m, x):
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        m(x)
    return fc.get_total_flops() / 2


@pytest.mark.parametrize("sets", [[], ["model.norm.scheme=peri"], ["model.tie_embeddings=false"]],
                         ids=["pre", "peri", "untied"])
def test_counts_match_module_and_flop_counter(sets):
    cfg = tiny(*MOLE, *sets).model
    m = MoELM(cfg)
    res = count(cfg, batch=2, seq_len=24, full_attention=True)
    assert res["params_total"] == sum(p.numel() for p in m.parameters())
    assert res["params_active"] == res["params_total"]  # training form: every expert runs
    measured = _flops(m, torch.randint(0, 97, (2, 24)))
    assert abs(res["macs_forward"] - measured) / measured < 0.02, (res["macs_forward"], measured)


class _RandomRows:
    """A RowSource stand-in: rows of the right shape for the FLOP count."""

    def __init__(self, shape_BTND):
        self.shape = shape_BTND

    def rows(self, layer_idx, device, dtype):
        return torch.randn(self.shape, device=device, dtype=dtype)


def test_lookup_form_counts_match_module_and_flop_counter():
    cfg = tiny(*MOLE, "model.ffn.kind=mole_lookup").model
    m = MoELM(cfg)
    with pytest.raises(RuntimeError, match="no lookup tables attached"):
        m(torch.randint(0, 97, (1, 3)))
    src = _RandomRows((2, 24, 3, cfg.d_model))
    for block in m.layers:
        assert isinstance(block.ffn, MoLELookupFFN)
        block.ffn.source = src
    res = count(cfg, batch=2, seq_len=24, full_attention=True)
    assert res["params_total"] == sum(p.numel() for p in m.parameters())
    measured = _flops(m, torch.randint(0, 97, (2, 24)))
    assert abs(res["macs_forward"] - measured) / measured < 0.02, (res["macs_forward"], measured)
    # inference form = training form minus the experts' matmuls and the expert norm
    train = count(tiny(*MOLE).model, batch=2, seq_len=24, full_attention=True)
    experts = 2 * 24 * 2 * 3 * (2 * cfg.d_model * 16)  # B*T * L * N * (two matmuls)
    mix = 2 * 24 * 2 * 3 * cfg.d_model
    assert train["macs_forward"] - res["macs_forward"] == experts - mix


# MoLE paper Table 2, "train params" (billions, 2 decimals)
PAPER_TABLE2 = {
    "160m-dense": 0.16, "160m-moe10e": 0.39, "160m-mole4e": 0.39, "160m-moe34e": 1.07,
    "160m-mole16e": 1.07, "410m-dense": 0.41, "410m-moe10e": 1.21, "410m-mole4e": 1.21,
    "410m-moe34e": 3.63, "410m-mole16e": 3.63, "1b-dense": 1.01, "1b-moe10e": 3.16,
    "1b-mole4e": 3.16,
}


@pytest.mark.parametrize("name", list(PAPER_TABLE2))
def test_paper_presets_reproduce_table2_train_params(name):
    cfg = load_preset(f"mole-paper-{name}").model
    res = count(cfg)
    assert round(res["params_total"] / 1e9, 2) == PAPER_TABLE2[name]
    if cfg.ffn.kind == "mole":
        # MoLE-NE vs MoE-(2.5N)E of the same group: same train params, same active FFN width
        assert cfg.ffn.expert_dim == cfg.ffn.d_ff and cfg.ffn.top_k == cfg.ffn.n_experts
        lookup = count(load_preset(f"mole-paper-{name}").with_overrides(
            ["model.ffn.kind=mole_lookup"]).model)
        dense = count(load_preset(f"mole-paper-{name.split('-')[0]}-dense").model)
        # inference MACs: the dense model's plus the router and the N-row mix (< 0.3%)
        assert 0 < lookup["macs_forward"] / dense["macs_forward"] - 1 < 0.003
