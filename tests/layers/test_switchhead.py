"""SwitchHead attention: explicit float64 reference, per-head routing and entropy, cache, counts."""
import math

import pytest
import torch

from helpers import (assert_causal_and_cached, assert_counts_match, assert_matches_reference,
                     sharpened_model, tiny)
from moelab.config import load_preset
from moelab.errors import ConfigError
from moelab.layers.base import ForwardContext
from moelab.layers.switchhead import SwitchHeadAttention
from moelab.model import MoELM

SH = ["model.attention.kind=switchhead", "model.attention.n_heads=2", "model.attention.head_dim=8",
      "model.attention.n_experts=4", "model.attention.top_k=2", "model.router.entropy_coef=0.001"]
VARIANTS = {
    "k2": SH,
    "k1_expert_dim": SH + ["model.attention.top_k=1", "model.attention.expert_dim=6"],
    "one_expert": SH + ["model.attention.n_experts=1", "model.attention.top_k=1"],
    "g1_elementwise": SH + ["model.attention.gate.position=sdpa"],
    "g1_headwise": SH + ["model.attention.gate.position=sdpa",
                         "model.attention.gate.granularity=headwise"],
    "peri_ln": SH + ["model.norm.scheme=peri"],
    "qk_norm_rope_half": SH + ["model.attention.qk_norm=true", "model.attention.rope_fraction=0.5"],
    "softmax_router": SH + ["model.attention.router_kind=softmax_topk"],
}


def _layer(sets, backend="loop"):
    cfg = tiny(*sets, f"model.moe_backend={backend}").model
    torch.manual_seed(0)
    layer = SwitchHeadAttention(cfg, 0).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def _reference(layer, x_BTD):
    """Loop over tokens, heads and chosen experts (reference 1.3), written out."""
    B, T, _ = x_BTD.shape
    H, dh, dv, Ea, k = layer.H, layer.dh, layer.dv, layer.Ea, layer.top_k
    xn = layer.in_norm(x_BTD)
    q = layer.rope(layer.q_norm((xn @ layer.q_proj.weight.t()).view(B, T, H, dh)).transpose(1, 2))
    kk = layer.rope(layer.k_norm((xn @ layer.k_proj.weight.t()).view(B, T, H, dh)).transpose(1, 2))
    q, kk = q * dh ** -0.25, kk * dh ** -0.25  # MoEUT's split scaling, softmax scale 1

    def choose(router, b, t):
        # raw sigmoid gates (or per-head softmax) of the per-head top-k; routers work in float32
        logits = (xn.float() @ router.router.weight.float().t()).view(B, T, H, Ea)
        sigmoid = router.router.cfg.kind == "sigmoid_topk"
        s = (torch.sigmoid(logits) if sigmoid else logits.softmax(-1)).double()[b, t]
        return [[(int(e), s[h, e]) for e in s[h].topk(k).indices] for h in range(H)]

    v = [[[None] * T for _ in range(H)] for _ in range(B)]
    for b in range(B):
        for t in range(T):
            sel = choose(layer.v_router, b, t) if Ea > 1 else None
            for h in range(H):
                if Ea > 1:
                    v[b][h][t] = sum(g * (x_BTD[b, t] @ layer.w_v_EDV[h * Ea + e])
                                     for e, g in sel[h])
                else:
                    v[b][h][t] = x_BTD[b, t] @ layer.v_proj.weight[h * dv:(h + 1) * dv].t()
    rows = []
    for b in range(B):
        for t in range(T):
            sel = choose(layer.o_router, b, t) if Ea > 1 else None
            y = torch.zeros(x_BTD.shape[-1], dtype=x_BTD.dtype)
            for h in range(H):
                p = torch.softmax(torch.stack([q[b, h, t] @ kk[b, h, s] for s in range(t + 1)]), 0)
                o = sum(p[s] * v[b][h][s] for s in range(t + 1))
                if layer.gate_proj is not None:
                    gw = layer.gw
                    w_gate = layer.gate_proj.weight[h * gw:(h + 1) * gw]
                    o = o * torch.sigmoid(xn[b, t] @ w_gate.t())
                if Ea > 1:
                    y = y + sum(g * (o @ layer.w_o_EVD[h * Ea + e]) for e, g in sel[h])
                else:
                    g = torch.sigmoid(xn[b, t] @ layer.sel_o.weight[h])
                    y = y + g * (o @ layer.o_proj.weight[:, h * dv:(h + 1) * dv].t())
            rows.append(y)
    return torch.stack(rows).view(B, T, -1)


@pytest.mark.parametrize("backend", ["loop", "auto"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_explicit_reference_outputs_and_grads(name, backend):
    layer = _layer(VARIANTS[name], backend)
    x = torch.randn(2, 5, layer.q_proj.in_features, dtype=torch.float64)
    assert_matches_reference(layer, _reference, x)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality_and_cached_decoding(name):
    m = sharpened_model(*VARIANTS[name])
    assert_causal_and_cached(m, seq=15)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_counts_match_module_and_flop_counter(name):
    assert_counts_match(tiny(*VARIANTS[name], "model.moe_backend=loop").model)


def test_tiny_preset_macs_match_flop_counter():
    assert_counts_match(load_preset("switchhead-tiny").with_overrides(["model.moe_backend=loop"]).model,
                        batch=1, seq=32)


def test_entropy_regulariser_is_per_head_marginal():
    """MoEUT 1.4: per sequence and head, the negative entropy of the time-pooled softmax over
    that head's Ea experts, averaged over batch and heads; one loss per router."""
    m = sharpened_model(*SH)
    m.train()
    x = torch.randint(0, 97, (3, 7))
    out = m(x)
    keys = sorted(k for k in out.aux_losses if k.endswith(".entropy"))
    assert keys == [f"layer{i}.attn_{r}_router.entropy" for i in (0, 1) for r in ("o", "v")]
    layer = m.layers[0].attn
    xn = m.layers[0].attn_norm(m.embed(x))
    logits = (xn @ layer.v_router.router.weight.t()).view(3, 7, 2, 4)
    marg = logits.softmax(-1).mean(1)  # (B, H, Ea)
    expect = 0.001 * (marg * marg.log()).sum(-1).mean()
    assert torch.allclose(out.aux_losses["layer0.attn_v_router.entropy"], expect, atol=1e-7)


def test_attention_entropy_coef_overrides_the_router_one():
    m = sharpened_model(*SH, "model.attention.entropy_coef=0.0", "model.router.entropy_coef=0.5")
    assert not any(k.endswith(".entropy") for k in m(torch.randint(0, 97, (1, 5))).aux_losses)
    layer = SwitchHeadAttention(tiny(*SH, "model.attention.entropy_coef=0.002").model, 0)
    assert layer.v_router.router.cfg.entropy_coef == 0.002
    assert layer.o_router.router.cfg.kind == "sigmoid_topk"  # MoEUT's default


def test_one_expert_has_no_router_and_dense_value_output():
    layer = _layer(VARIANTS["one_expert"])
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                     "sel_o.weight"}
    ctx = ForwardContext()
    layer(torch.randn(1, 4, 32, dtype=torch.float64), None, 0, ctx)
    assert not ctx.aux_losses and not ctx.metrics


@pytest.mark.parametrize("sets, field", [
    (["model.attention.n_kv_heads=1"], "n_kv_heads"),
    (["model.attention.bias=true"], "bias"),
    (["model.attention.gate.position=value"], "gate.position"),
    (["model.attention.n_experts=0"], "n_experts"),
])
def test_config_errors_name_the_field(sets, field):
    with pytest.raises(ConfigError, match=field):
        SwitchHeadAttention(tiny(*SH, *sets).model, 0)


def test_diagnostics_first_token_with_zero_queries():
    m = MoELM(tiny(*SH).model).eval()
    with torch.no_grad():
        for blk in m.layers:
            blk.attn.q_proj.weight.zero_()
    T = 6
    out = m(torch.randint(0, 97, (2, T)), diagnostics=True)
    expect = sum(1 / (t + 1) for t in range(1, T)) / (T - 1)
    assert torch.allclose(out.diagnostics["attn_first_token"], torch.full((2,), expect), atol=1e-6)
    assert math.isfinite(out.diagnostics["max_activation"].sum().item())
