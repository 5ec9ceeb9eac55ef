import math

import pytest
import torch

from helpers import ATTENTION_OPTIONS, sharpened_model, tiny
from moelab.layers.attention import DenseAttention
from moelab.layers.base import ForwardContext
from moelab.model import MoELM

torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("name", list(ATTENTION_OPTIONS))
def test_causality(name):
    m = sharpened_model(*ATTENTION_OPTIONS[name])
    x = torch.randint(0, 97, (2, 12))
    base = m(x).logits
    for t in (0, 5, 10):
        y = x.clone()
        y[:, t + 1] = (y[:, t + 1] + 1 + torch.arange(2)) % 97
        out = m(y).logits
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), name
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])


@pytest.mark.parametrize("name", list(ATTENTION_OPTIONS))
def test_cached_decoding_equals_full_forward(name):
    m = sharpened_model(*ATTENTION_OPTIONS[name])
    x = torch.randint(0, 97, (2, 15))
    full = m(x).logits
    # prefill 6, then a 4-token chunk (masked, with a cache prefix), then single tokens
    cache = m.new_cache()
    parts = [m(x[:, :6], cache=cache).logits, m(x[:, 6:10], cache=cache).logits]
    parts += [m(x[:, t:t + 1], cache=cache).logits for t in range(10, 15)]
    assert cache.seq_len == 15
    inc = torch.cat(parts, dim=1)
    assert (inc - full).abs().max().item() < 1e-5, name


def _explicit_attention(q_BHTD, k_BKTD, v_BKTD):
    H, K = q_BHTD.shape[1], k_BKTD.shape[1]
    k = k_BKTD.repeat_interleave(H // K, 1)
    v = v_BKTD.repeat_interleave(H // K, 1)
    s = q_BHTD @ k.transpose(-1, -2) / math.sqrt(q_BHTD.shape[-1])
    T = s.shape[-1]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return s.softmax(-1) @ v


@pytest.mark.parametrize("granularity", ["headwise", "elementwise"])
@pytest.mark.parametrize("n_kv", [4, 2])
def test_g1_gate_matches_explicit_reference(granularity, n_kv):
    cfg = tiny("model.attention.gate.position=sdpa", f"model.attention.gate.granularity={granularity}",
               f"model.attention.n_kv_heads={n_kv}", "model.attention.rope_fraction=0").model
    torch.manual_seed(1)
    attn = DenseAttention(cfg, 0).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    B, T, d, H, Dh = 2, 7, cfg.d_model, 4, cfg.head_dim
    G = H // n_kv
    x = torch.randn(B, T, d, dtype=torch.float64)
    # Reference: the fused projection holds, per KV group, [G query heads | their gates]
    gw = Dh if granularity == "elementwise" else 1
    Wq = attn.q_proj.weight.view(n_kv, G * Dh + G * gw, d)
    W_query = Wq[:, : G * Dh].reshape(H * Dh, d)
    W_gate = Wq[:, G * Dh:].reshape(H * gw, d)
    q = (x @ W_query.t()).view(B, T, H, Dh).transpose(1, 2)
    k = (x @ attn.k_proj.weight.t()).view(B, T, n_kv, Dh).transpose(1, 2)
    v = (x @ attn.v_proj.weight.t()).view(B, T, n_kv, Dh).transpose(1, 2)
    o_BTHD = _explicit_attention(q, k, v).transpose(1, 2)
    gate_BTHG = torch.sigmoid(x @ W_gate.t()).view(B, T, H, gw)  # Y' = Y * sigmoid(X W_theta)
    ref = (o_BTHD * gate_BTHG).reshape(B, T, H * Dh) @ attn.o_proj.weight.t()
    out = attn(x, None, 0, ForwardContext())
    assert torch.allclose(out, ref, atol=1e-10)


def test_g2_gates_values():
    cfg = tiny("model.attention.gate.position=value", "model.attention.rope_fraction=0").model
    attn = DenseAttention(cfg, 0).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    B, T, d, H, Dh = 1, 5, cfg.d_model, 4, cfg.head_dim
    x = torch.randn(B, T, d, dtype=torch.float64)
    Wq = attn.q_proj.weight.view(H, Dh + Dh, d)  # MHA: one query head per group, then its value gate
    q = (x @ Wq[:, :Dh].reshape(H * Dh, d).t()).view(B, T, H, Dh).transpose(1, 2)
    g = torch.sigmoid(x @ Wq[:, Dh:].reshape(H * Dh, d).t()).view(B, T, H, Dh).transpose(1, 2)
    k = (x @ attn.k_proj.weight.t()).view(B, T, H, Dh).transpose(1, 2)
    v = (x @ attn.v_proj.weight.t()).view(B, T, H, Dh).transpose(1, 2) * g
    ref = _explicit_attention(q, k, v).transpose(1, 2).reshape(B, T, H * Dh) @ attn.o_proj.weight.t()
    assert torch.allclose(attn(x, None, 0, ForwardContext()), ref, atol=1e-10)


def test_dense_attention_matches_explicit_with_rope_and_gqa():
    cfg = tiny("model.attention.n_kv_heads=2").model
    attn = DenseAttention(cfg, 0).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    B, T, d, H, Dh = 2, 9, cfg.d_model, 4, cfg.head_dim
    x = torch.randn(B, T, d, dtype=torch.float64)
    q = (x @ attn.q_proj.weight.t()).view(B, T, H, Dh).transpose(1, 2)
    k = (x @ attn.k_proj.weight.t()).view(B, T, 2, Dh).transpose(1, 2)
    v = (x @ attn.v_proj.weight.t()).view(B, T, 2, Dh).transpose(1, 2)

    def rope(t):  # rotate-half RoPE written out: pairs (i, i + D/2) rotate by pos * theta^(-2i/D)
        pos = torch.arange(T, dtype=torch.float64)[:, None]
        freq = 10000.0 ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
        ang = pos * freq
        a, b = t[..., : Dh // 2], t[..., Dh // 2:]
        return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)

    ref = _explicit_attention(rope(q), rope(k), v).transpose(1, 2).reshape(B, T, H * Dh)
    ref = ref @ attn.o_proj.weight.t()
    assert torch.allclose(attn(x, None, 0, ForwardContext()), ref, atol=1e-10)


def _project(attn, x, H, K, Dh):
    B, T, _ = x.shape
    q = attn.q_proj(x).view(B, T, H, Dh)
    k = attn.k_proj(x).view(B, T, K, Dh)
    v = attn.v_proj(x).view(B, T, K, Dh).transpose(1, 2)
    return q, k, v


def test_sliding_window_matches_explicit_band_mask_and_cache():
    """Query p sees keys p - w < j <= p (Mistral's sliding window), full forward and cached."""
    w = 3
    cfg = tiny(f"model.attention.sliding_window={w}", "model.attention.rope_fraction=0",
               "model.attention.n_kv_heads=2").model
    attn = DenseAttention(cfg, 0).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    B, T, H, K, Dh = 2, 9, 4, 2, cfg.head_dim
    x = torch.randn(B, T, cfg.d_model, dtype=torch.float64)
    q, k, v = _project(attn, x, H, K, Dh)
    s = q.transpose(1, 2) @ k.transpose(1, 2).repeat_interleave(2, 1).transpose(-1, -2)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    s = (s / math.sqrt(Dh)).masked_fill((j > i) | (j <= i - w), float("-inf"))
    o = (s.softmax(-1) @ v.repeat_interleave(2, 1)).transpose(1, 2).reshape(B, T, H * Dh)
    ref = attn.o_proj(o)
    assert torch.allclose(attn(x, None, 0, ForwardContext()), ref, atol=1e-10)
    from moelab.layers.base import LayerCache

    cache = LayerCache()
    parts = [attn(x[:, :4], cache, 0, ForwardContext()), attn(x[:, 4:6], cache, 4, ForwardContext())]
    parts += [attn(x[:, t:t + 1], cache, t, ForwardContext()) for t in range(6, T)]
    assert torch.allclose(torch.cat(parts, 1), ref, atol=1e-10)


def test_qk_norm_over_all_heads_and_qkv_bias():
    """OLMoE's QK-norm normalises q_proj's whole output (all heads) before the head split;
    Qwen2's biases sit on q, k and v but not on the output projection."""
    cfg = tiny("model.attention.qk_norm=true", "model.attention.qk_norm_scope=all",
               "model.attention.qkv_bias=true", "model.attention.rope_fraction=0",
               "model.attention.n_kv_heads=2").model
    attn = DenseAttention(cfg, 0).double()
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    for p in attn.parameters():
        torch.nn.init.normal_(p, mean=0.5, std=0.3)
    B, T, H, K, Dh = 1, 6, 4, 2, cfg.head_dim
    x = torch.randn(B, T, cfg.d_model, dtype=torch.float64)

    def rms(t, w):  # over the whole last dim
        return t / (t.pow(2).mean(-1, keepdim=True) + cfg.norm.eps).sqrt() * w

    q = rms(attn.q_proj(x), attn.q_norm.norm.weight).view(B, T, H, Dh).transpose(1, 2)
    k = rms(attn.k_proj(x), attn.k_norm.norm.weight).view(B, T, K, Dh).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, K, Dh).transpose(1, 2)
    ref = attn.o_proj(_explicit_attention(q, k, v).transpose(1, 2).reshape(B, T, H * Dh))
    assert torch.allclose(attn(x, None, 0, ForwardContext()), ref, atol=1e-10)


def test_options_for_other_attention_kinds_are_refused():
    from moelab.errors import ConfigError

    for opt in ("sliding_window=8", "qkv_bias=true", "qk_norm_scope=all",
                "rope_scaling.kind=linear"):
        with pytest.raises(ConfigError, match="attention.kind 'dense' only"):
            tiny(f"model.attention.{opt}", base="switchhead-tiny")


def test_diagnostics_first_token_and_max_activation():
    m = MoELM(tiny("model.n_layers=3").model).eval()
    with torch.no_grad():  # zero queries: uniform causal attention, so weight on token 0 is 1/(t+1)
        for blk in m.layers:
            blk.attn.q_proj.weight.zero_()
    T = 8
    out = m(torch.randint(0, 97, (2, T)), diagnostics=True)
    expect = sum(1 / (t + 1) for t in range(1, T)) / (T - 1)
    assert out.diagnostics["attn_first_token"].shape == (3,)
    assert torch.allclose(out.diagnostics["attn_first_token"], torch.full((3,), expect), atol=1e-6)
    assert out.diagnostics["max_activation"].shape == (3,)
    assert (out.diagnostics["max_activation"] > 0).all()
    assert m(torch.randint(0, 97, (2, T))).diagnostics == {}


def _explicit_causal(q, k, v, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    T = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("H,Hk,T,dk,dv,block", [(4, 1, 150, 16, 40, 64), (6, 2, 70, 8, 24, 32),
                                                 (3, 3, 5, 4, 12, 64), (2, 1, 64, 8, 16, 64)])
def test_blocked_causal_attention_matches_explicit_float64(H, Hk, T, dk, dv, block):
    from moelab.layers.attention import blocked_causal_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, T, d, generator=g, dtype=torch.float64, requires_grad=True)
               for h, d in ((H, dk), (Hk, dk), (Hk, dv)))
    out = blocked_causal_attention(q, k, v, 0.3, block)
    ref = _explicit_causal(q, k, v, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * dy).sum(), (q, k, v)),
                    torch.autograd.grad((ref * dy).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_causal_attention_takes_the_blocked_path_for_wide_values(monkeypatch):
    """UMoE's d-wide values: no flash kernel on CPU, so `causal_attention` computes block by
    block; bf16 keeps its float32 softmax and stays close to the float64 reference."""
    import moelab.layers.attention as attention

    calls = []
    orig = attention.blocked_causal_attention
    monkeypatch.setattr(attention, "blocked_causal_attention",
                        lambda *a, **kw: calls.append(1) or orig(*a, **kw))
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 100, 8, generator=g), torch.randn(1, 1, 100, 8, generator=g), \
        torch.randn(1, 1, 100, 32, generator=g)
    out = attention.causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), past=0)
    ref = _explicit_causal(q.double(), k.double(), v.double(), 8 ** -0.5)
    assert calls == [1] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=0.02, atol=0.02)
    attention.causal_attention(q, k, v[..., :8], past=0)  # equal widths: SDPA
    assert calls == [1]
