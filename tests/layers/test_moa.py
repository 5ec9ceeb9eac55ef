"""Mixture of attention heads: explicit float64 reference, cache, counts."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import tiny
from moelab.config import load_preset
from moelab.errors import ConfigError
from moelab.flops import count
from moelab.layers.base import ForwardContext
from moelab.layers.moa import MixtureOfAttentionHeads
from moelab.model import MoELM

MOA = ["model.attention.kind=moa", "model.attention.head_dim=8", "model.attention.n_experts=6",
       "model.attention.top_k=2", "model.attention.n_shared_experts=1",
       "model.router.seq_coef=0.001"]
VARIANTS = {
    "shared": MOA,
    "no_shared_dv": MOA + ["model.attention.n_shared_experts=0", "model.attention.expert_dim=12"],
    "g1_elementwise": MOA + ["model.attention.gate.position=sdpa"],
    "g1_headwise": MOA + ["model.attention.gate.position=sdpa",
                          "model.attention.gate.granularity=headwise"],
    "peri_ln_qk_norm": MOA + ["model.norm.scheme=peri", "model.attention.qk_norm=true"],
    "renorm_rope_half": MOA + ["model.router.renormalize=true",
                               "model.attention.rope_fraction=0.5"],
}


def _layer(sets, backend="loop"):
    cfg = tiny(*sets, f"model.moe_backend={backend}").model
    torch.manual_seed(0)
    layer = MixtureOfAttentionHeads(cfg, 0).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def _reference(layer, x_BTD):
    """Loop over tokens and their heads (shared head, then the chosen experts), written out."""
    B, T, _ = x_BTD.shape
    xn = layer.in_norm(x_BTD)
    dk, k, ns = layer.dk, layer.top_k, layer.n_shared
    # the router's float32 logits, softmax, top-k and renormalisation (bit-equal here)
    w32, idx32 = (xn.float() @ layer.router.weight.float().t()).softmax(-1).topk(k)
    if layer.router.cfg.renormalize:
        w32 = w32 / w32.sum(-1, keepdim=True)
    key = layer.rope(layer.k_norm(xn @ layer.k_proj.weight.t())[:, None])[:, 0]  # (B, T, dk)
    val = x_BTD @ layer.v_proj.weight.t()
    rows = []
    for b in range(B):
        for t in range(T):
            w, idx = w32[b, t].double(), idx32[b, t]
            heads = [(None, 1.0)] if ns else []
            heads += [(int(e), w[j]) for j, e in enumerate(idx)]
            y = torch.zeros(x_BTD.shape[-1], dtype=x_BTD.dtype)
            for e, p in heads:
                wq = layer.q_shared.weight.t() if e is None else layer.w_q_EDK[e]
                q = xn[b, t] @ wq
                q = layer.rope(layer.q_norm(q).view(1, 1, 1, dk), t).view(dk)
                a = torch.softmax(torch.stack([q @ key[b, s] for s in range(t + 1)]) / dk ** 0.5, 0)
                o = sum(a[s] * val[b, s] for s in range(t + 1))
                if layer.gw:
                    wg = layer.g_shared.weight.t() if e is None else layer.w_g_EDG[e]
                    o = o * torch.sigmoid(xn[b, t] @ wg)
                wo = layer.o_shared.weight.t() if e is None else layer.w_o_EVD[e]
                y = y + p * (o @ wo)
            rows.append(y)
    return torch.stack(rows).view(B, T, -1)


@pytest.mark.parametrize("backend", ["loop", "auto"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_matches_explicit_reference_outputs_and_grads(name, backend):
    layer = _layer(VARIANTS[name], backend)
    x = torch.randn(2, 5, layer.k_proj.in_features, dtype=torch.float64, requires_grad=True)
    y = layer(x, None, 0, ForwardContext())
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _reference(layer, x_ref)
    assert torch.allclose(y, y_ref, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(y)
    names, params = zip(*layer.named_parameters())
    grads = torch.autograd.grad(y, [x, *params], g)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *params], g)
    for n, a, b in zip(("x",) + names, grads, grads_ref):
        tol = 1e-5 if "router" in n else 1e-9  # the router's gradient passes float32 logits
        assert torch.allclose(a, b, rtol=tol, atol=tol), n


def _model(sets):
    torch.manual_seed(0)
    m = MoELM(tiny(*sets).model).eval()
    with torch.no_grad():  # larger weights than the init, so attention is far from uniform
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    return m


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality_and_cached_decoding(name):
    m = _model(VARIANTS[name])
    x = torch.randint(0, 97, (2, 15))
    full = m(x).logits
    for t in (0, 5, 10):
        y = x.clone()
        y[:, t + 1] = (y[:, t + 1] + 1 + torch.arange(2)) % 97
        out = m(y).logits
        assert (out[:, : t + 1] - full[:, : t + 1]).abs().max() < 1e-5
        assert not torch.allclose(out[:, t + 1], full[:, t + 1])
    cache = m.new_cache()
    parts = [m(x[:, :6], cache=cache).logits, m(x[:, 6:10], cache=cache).logits]
    parts += [m(x[:, t:t + 1], cache=cache).logits for t in range(10, 15)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5
    # one shared key head (d_k) and one value head (d_v) per token per layer
    a = m.config.attention
    assert cache.numel() == 2 * 15 * m.config.n_layers * (8 + (a.expert_dim or 8))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_counts_match_module_and_flop_counter(name):
    cfg = tiny(*VARIANTS[name], "model.moe_backend=loop").model
    m = MoELM(cfg)
    res = count(cfg, batch=2, seq_len=12, full_attention=True)
    assert res["params_total"] == sum(p.numel() for p in m.parameters())
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        m(x)
    measured = fc.get_total_flops() / 2
    assert abs(res["macs_forward"] - measured) / measured < 0.02


def test_tiny_preset_macs_match_flop_counter():
    cfg = load_preset("moa-tiny").with_overrides(["model.moe_backend=loop"]).model
    m = MoELM(cfg)
    res = count(cfg, batch=1, seq_len=32, full_attention=True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        m(torch.randint(0, cfg.vocab_size, (1, 32)))
    assert abs(res["macs_forward"] - fc.get_total_flops() / 2) / res["macs_forward"] < 0.02


def test_balance_loss_and_metrics_per_layer():
    m = _model(MOA)
    out = m(torch.randint(0, 97, (2, 9)))
    assert sorted(out.aux_losses) == ["layer0.attn_router.seq", "layer1.attn_router.seq"]
    assert out.metrics["layer0.attn_router.load"].shape == (6,)


@pytest.mark.parametrize("sets, field", [
    (["model.attention.bias=true"], "bias"),
    (["model.attention.gate.position=value"], "gate.position"),
    (["model.attention.n_experts=0", "model.attention.top_k=0"], "n_experts"),
    (["model.attention.top_k=0"], "top_k"),
])
def test_config_errors_name_the_field(sets, field):
    with pytest.raises(ConfigError, match=field):
        MixtureOfAttentionHeads(tiny(*MOA, *sets).model, 0)
