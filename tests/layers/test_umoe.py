"""UMoE: the pre-mixing reformulation of MHA, UMoE-Att against an explicit float64 reference, the
expert bank shared by attention and FFN, cache size, counts and the paper presets."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import (assert_causal_and_cached, assert_counts_match, assert_matches_reference,
                     sharpened_model, tiny)
from moelab.config import load_preset
from moelab.errors import ConfigError
from moelab.flops import count
from moelab.layers.base import ForwardContext
from moelab.layers.experts import ExpertBank
from moelab.layers.routers import Routing
from moelab.layers.umoe import PreMixingAttention, UMoEFFN
from moelab.model import MoELM
from moelab.ops import combine, routed_matmul

UA = ["model.attention.kind=umoe_att", "model.attention.head_dim=8", "model.attention.n_experts=6",
      "model.attention.top_k=2", "model.attention.n_shared_experts=1", "model.attention.q_rank=4",
      "model.attention.expert_dim=12", "model.router.seq_coef=0.001"]
U = UA + ["model.ffn.kind=umoe_ffn", "model.ffn.n_experts=6", "model.ffn.top_k=3",
          "model.ffn.expert_dim=12", "model.ffn.gated=false", "model.ffn.n_shared_experts=1",
          "model.ffn.shared_expert_dim=10"]
VARIANTS = {
    "att": UA,
    "att_no_shared_rank0": UA + ["model.attention.n_shared_experts=0", "model.attention.q_rank=0"],
    "att_g1_headwise": UA + ["model.attention.gate.position=sdpa",
                             "model.attention.gate.granularity=headwise"],
    "att_g1_elementwise": UA + ["model.attention.gate.position=sdpa"],
    "att_peri_qk_norm": UA + ["model.norm.scheme=peri", "model.attention.qk_norm=true"],
    "umoe": U,
    "umoe_g1_peri": U + ["model.attention.gate.position=sdpa", "model.norm.scheme=peri"],
}
ATT_VARIANTS = [n for n in VARIANTS if n.startswith("att")]


def _init(module, std=0.3):
    for p in module.parameters():
        torch.nn.init.normal_(p, std=std)
    return module


def _layer(sets, backend="loop"):
    torch.manual_seed(0)
    return _init(PreMixingAttention(tiny(*sets, f"model.moe_backend={backend}").model, 0).double())


class _AllExperts(nn.Module):
    """Router stub: every token picks every expert with weight 1."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, x_BTD, ctx):
        B, T, _ = x_BTD.shape
        idx = torch.arange(self.n).expand(B, T, self.n)
        return Routing(idx, torch.ones(B, T, self.n), torch.zeros(B, T, self.n))


class _LinearBank(ExpertBank):
    """Linear experts E(z) = z W1 W2, still through the routed engine."""

    def forward(self, x, plan, weights_TK=None):
        h_SH = routed_matmul(x, self.w1_EDH, plan, gather=True)
        return combine(routed_matmul(h_SH, self.w2_EHD, plan, gather=False), plan, weights_TK)


def test_reformulation_identity_with_multi_head_attention():
    """UMoE eq. 6-9: with all h experts selected at weight 1, linear experts and no shared
    expert, sum_i E_i(a_i X) is multi-head attention with W_v^i = W1_i, W_o = [W2_1; ...; W2_h]
    (one key head, per-head queries W_q + W_a^i W_b^i)."""
    h, dk, dv = 4, 8, 6
    cfg = tiny(*UA, f"model.attention.n_experts={h}", f"model.attention.top_k={h}",
               "model.attention.n_shared_experts=0", f"model.attention.q_rank={dk}",
               f"model.attention.expert_dim={dv}").model
    torch.manual_seed(0)
    layer = _init(PreMixingAttention(cfg, 0).double())
    layer.router = _AllExperts(h)
    layer.rank_norm = nn.Identity()  # eq. 11 as printed: q_i = x W_q + x W_a^i W_b^i
    bank = layer.experts
    layer.experts = _LinearBank(h, cfg.d_model, dv).double()
    layer.experts.load_state_dict(bank.state_dict())
    B, T, d = 2, 7, cfg.d_model
    x = torch.randn(B, T, d, dtype=torch.float64)
    # standard MHA, computed explicitly
    Wq = layer.q_proj.weight.t()[None] + layer.w_a_EDR @ layer.w_b_ERK  # (h, d, dk)
    q = layer.rope(torch.einsum("btd,hdk->bhtk", x, Wq))
    k = layer.rope((x @ layer.k_proj.weight.t())[:, None])  # (B, 1, T, dk)
    v = torch.einsum("btd,hdv->bhtv", x, bank.w1_EDH)  # W_v^i = W1_i
    s = (q @ k.transpose(-1, -2)) / dk ** 0.5
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, h * dv)  # [o_1; ...; o_h]
    mha = o @ bank.w2_EHD.reshape(h * dv, d)  # W_o = [W2_1; ...; W2_h]
    assert torch.allclose(layer(x, None, 0, ForwardContext()), mha, rtol=1e-10, atol=1e-10)


def _reference(layer, x_BTD):
    """Loop over tokens and their heads (shared, then the chosen experts), written out."""
    B, T, D = x_BTD.shape
    un = layer.in_norm(x_BTD)
    dk, k = layer.dk, layer.top_k
    w32, idx32 = (un.float() @ layer.router.weight.float().t()).softmax(-1).topk(k)
    key = layer.rope(layer.k_norm(un @ layer.k_proj.weight.t())[:, None])[:, 0]  # (B, T, dk)
    bank = layer.experts
    rows = []
    for b in range(B):
        for t in range(T):
            heads = [(None, 1.0)] if layer.n_shared else []
            heads += [(int(e), w32[b, t, j].double()) for j, e in enumerate(idx32[b, t])]
            y = torch.zeros(D, dtype=x_BTD.dtype)
            for e, p in heads:
                if e is None:
                    q = un[b, t] @ layer.q_shared.weight.t()
                else:
                    q = un[b, t] @ layer.q_proj.weight.t()
                    if layer.rank:
                        q = q + layer.rank_norm(un[b, t] @ layer.w_a_EDR[e]) @ layer.w_b_ERK[e]
                q = layer.rope(layer.q_norm(q).view(1, 1, 1, dk), t).view(dk)
                a = torch.softmax(torch.stack([q @ key[b, s] for s in range(t + 1)]) / dk ** 0.5, 0)
                m = sum(a[s] * x_BTD[b, s] for s in range(t + 1))  # values: the hidden states
                if layer.gw:
                    wg = layer.g_shared.weight.t() if e is None else layer.w_g_EDG[e]
                    m = m * torch.sigmoid(un[b, t] @ wg)
                if e is None:
                    y = y + F.silu(m @ layer.shared_up.weight.t()) @ layer.shared_down.weight.t()
                else:
                    y = y + p * (F.silu(m @ bank.w1_EDH[e]) @ bank.w2_EHD[e])
            rows.append(y)
    return torch.stack(rows).view(B, T, D)


@pytest.mark.parametrize("backend", ["loop", "auto"])
@pytest.mark.parametrize("name", ATT_VARIANTS)
def test_matches_explicit_reference_outputs_and_grads(name, backend):
    layer = _layer(VARIANTS[name], backend)
    x = torch.randn(2, 5, layer.d, dtype=torch.float64)
    assert_matches_reference(layer, _reference, x)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality_and_cached_decoding(name):
    m = sharpened_model(*VARIANTS[name])
    cache = assert_causal_and_cached(m, seq=15)
    # UMoE caches one key head and the hidden state: d_k + d values per token per layer
    cfg = m.config
    assert cache.numel() == 2 * 15 * cfg.n_layers * (cfg.head_dim + cfg.d_model)


@pytest.mark.parametrize("name", list(VARIANTS) + ["dense_attention_umoe_ffn"])
def test_counts_match_module_and_flop_counter(name):
    sets = VARIANTS.get(name) or U[8:]  # dense attention: the FFN makes and counts the bank
    res = assert_counts_match(tiny(*sets, "model.moe_backend=loop").model)
    assert res["params_active"] <= res["params_total"]


def test_bank_is_one_tensor_shared_by_attention_and_ffn():
    torch.manual_seed(0)
    m = MoELM(tiny(*U).model)
    blk = m.layers[0]
    assert blk.attn.experts is blk.ffn.experts
    bank = [p for n, p in m.named_parameters(remove_duplicate=False) if ".experts." in n]
    assert len(bank) == 2 * 2 * 2  # 2 layers x (attention, FFN) x (w1, w2) names ...
    assert len({id(p) for p in bank}) == 2 * 2  # ... over one tensor per layer and matrix
    assert count(m.config)["params_total"] == m.num_params()
    # gradients of the shared bank = attention's part + FFN's part (a copy of the FFN with its
    # own copy of the bank gives the FFN's part alone)
    x = torch.randn(2, 9, 32)
    blk(x, None, 0, ForwardContext()).square().sum().backward()
    split_ffn = UMoEFFN(m.config, 0)
    split_ffn.load_state_dict(blk.ffn.state_dict())
    attn = copy.deepcopy(blk.attn)
    attn.zero_grad()
    h = x + attn(blk.attn_norm(x), None, 0, ForwardContext())
    (h + split_ffn(blk.ffn_norm(h), ForwardContext())).square().sum().backward()
    for name in ("w1_EDH", "w2_EHD"):
        joint = getattr(blk.attn.experts, name).grad
        parts = getattr(attn.experts, name).grad + getattr(split_ffn.experts, name).grad
        assert torch.allclose(joint, parts, atol=1e-5), name


def test_either_build_order_shares_the_bank_and_mismatches_are_named():
    cfg = tiny(*U).model
    shared = {}
    ffn = UMoEFFN(cfg, 0, shared=shared)
    attn = PreMixingAttention(cfg, 0, shared=shared)
    assert attn.experts is ffn.experts
    with pytest.raises(ConfigError, match="model.ffn.n_experts"):
        MoELM(tiny(*U, "model.ffn.n_experts=8").model)
    with pytest.raises(ConfigError, match="gated"):
        MoELM(tiny(*U, "model.ffn.gated=true").model)
    with pytest.raises(ConfigError, match="gate.position"):
        PreMixingAttention(tiny(*UA, "model.attention.gate.position=value").model, 0)


def test_checkpoint_round_trip_keeps_the_bank_shared(tmp_path):
    from safetensors.torch import load_model, save_model

    torch.manual_seed(0)
    m = MoELM(tiny(*U).model).eval()
    save_model(m, str(tmp_path / "m.safetensors"))
    torch.manual_seed(1)
    m2 = MoELM(tiny(*U).model).eval()
    load_model(m2, str(tmp_path / "m.safetensors"))
    assert m2.layers[1].attn.experts is m2.layers[1].ffn.experts
    x = torch.randint(0, 97, (1, 8))
    assert torch.equal(m(x).logits, m2(x).logits)


def test_balance_losses_one_per_router():
    out = sharpened_model(*U)(torch.randint(0, 97, (2, 9)), stats=True)
    assert sorted(out.aux_losses) == [f"layer{i}.{r}_router.seq" for i in (0, 1)
                                      for r in ("attn", "ffn")]


REFERENCE_PARAMS = {  # reference part A4 (derived totals)
    "umoe-paper-base-dense": 134.1e6, "umoe-paper-base-ffnmoe": 535.2e6,
    "umoe-paper-base-moa": 524.5e6, "umoe-paper-base-umoe-att": 547.6e6,
    "umoe-paper-base-umoe": 540.5e6, "umoe-paper-large-dense": 1.09e9,
    "umoe-paper-large-ffnmoe": 3.81e9, "umoe-paper-large-moa": 3.66e9,
    "umoe-paper-large-switchhead": 3.91e9, "umoe-paper-large-umoe-att": 3.81e9,
    "umoe-paper-large-umoe": 3.68e9,
}


@pytest.mark.parametrize("name", list(REFERENCE_PARAMS))
def test_paper_preset_parameter_counts(name):
    total = count(load_preset(name).model)["params_total"]
    assert abs(total / REFERENCE_PARAMS[name] - 1) < 0.01, total


def test_paper_umoe_mac_overhead():
    """Reference A4: UMoE costs about 1.17x the dense model's MACs at base size and 1.03x at
    large size (full n^2 attention, 1024 tokens)."""
    def macs(name):
        return count(load_preset(name).model, seq_len=1024, full_attention=True)["macs_forward"]

    base = macs("umoe-paper-base-umoe") / macs("umoe-paper-base-dense")
    large = macs("umoe-paper-large-umoe") / macs("umoe-paper-large-dense")
    assert base == pytest.approx(1.17, abs=0.01) and large == pytest.approx(1.03, abs=0.01)


TINY = ["switchhead-tiny", "moa-tiny", "umoe-att-tiny", "umoe-tiny"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_match_dense_tiny_macs(name):
    dense = count(load_preset("dense-tiny").model, seq_len=128)["macs_per_token"]
    assert abs(count(load_preset(name).model, seq_len=128)["macs_per_token"] / dense - 1) < 0.10


@pytest.mark.parametrize("name", ["umoe-att-tiny", "umoe-tiny"])
def test_tiny_preset_macs_match_flop_counter(name):
    assert_counts_match(load_preset(name).with_overrides(["model.moe_backend=loop"]).model,
                        batch=1, seq=32)
