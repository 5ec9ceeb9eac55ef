"""Mixture of attention heads: explicit float64 reference, cache, counts."""
import pytest
import torch

from helpers import (assert_causal_and_cached, assert_counts_match, assert_matches_reference,
                     sharpened_model, tiny)
from moelab.config import load_preset
from moelab.errors import ConfigError
from moelab.layers.moa import MixtureOfAttentionHeads

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
    x = torch.randn(2, 5, layer.k_proj.in_features, dtype=torch.float64)
    assert_matches_reference(layer, _reference, x)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality_and_cached_decoding(name):
    m = sharpened_model(*VARIANTS[name])
    cache = assert_causal_and_cached(m, seq=15)
    # one shared key head (d_k) and one value head (d_v) per token per layer
    a = m.config.attention
    assert cache.numel() == 2 * 15 * m.config.n_layers * (8 + (a.expert_dim or 8))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_counts_match_module_and_flop_counter(name):
    assert_counts_match(tiny(*VARIANTS[name], "model.moe_backend=loop").model)


def test_tiny_preset_macs_match_flop_counter():
    assert_counts_match(load_preset("moa-tiny").with_overrides(["model.moe_backend=loop"]).model,
                        batch=1, seq=32)


def test_balance_loss_and_metrics_per_layer():
    m = sharpened_model(*MOA)
    out = m(torch.randint(0, 97, (2, 9)), stats=True)  # eval mode: asked for
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
