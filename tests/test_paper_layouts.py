"""The papers' checkpoint layouts and training details as config choices: MoEUT's biased LM head,
SwitchHead's router init, UMoE's kaiming-uniform routers, zero frozen padding row and balance
loss per micro-batch; the paper presets use them, the other presets keep moelab's defaults."""
import math

import pytest
import torch

from helpers import tiny
from moelab.config import load_preset
from moelab.flops import count
from moelab.layers.routers import Router
from moelab.model import MoELM

MOE = ["model.ffn.kind=moe", "model.ffn.n_experts=4", "model.ffn.top_k=2", "model.ffn.expert_dim=8",
       "model.router.seq_coef=0.5"]


def test_moeut_presets_have_the_biased_head():
    for size in ("44m", "126m", "244m", "318m", "727m", "1b"):
        cfg = load_preset(f"moeut-{size}").model
        assert cfg.head_bias and cfg.init.attn_router_renorm == "switchhead"
        without = count(cfg.__class__(**{**cfg.__dict__, "head_bias": False}))["params_total"]
        assert count(cfg)["params_total"] - without == cfg.vocab_size == 8000
    assert not load_preset("moeut-tiny").model.head_bias  # tiny CPU presets: unchanged


def test_head_bias_in_model_and_counts():
    cfg = tiny("model.head_bias=true", "model.tie_embeddings=false").model
    m = MoELM(cfg)
    assert m.head.bias is not None and m.head.bias.shape == (cfg.vocab_size,)
    assert count(cfg)["params_total"] == sum(p.numel() for p in m.parameters())
    x = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        m.head.bias.zero_()
        base = m(x).logits
        m.head.bias.copy_(torch.arange(97.0))
        assert torch.allclose(m(x).logits - base, torch.arange(97.0).expand(1, 5, 97), atol=1e-4)


def test_switchhead_renorm_rows_as_the_official_code():
    """Official SwitchHead: row r becomes x_r / |x_r| * std(x_r), then the matrix is divided by
    its std: row norms keep their spread (σ-MoE's rule makes them equal)."""
    sets = ["model.ffn.n_experts=8", "model.ffn.top_k=2", "model.ffn.expert_dim=16",
            "model.vocab_size=97", "model.d_model=48", "model.n_layers=4",
            "model.attention.head_dim=16"]
    for renorm in ("rows", "switchhead"):
        torch.manual_seed(0)
        m = MoELM(load_preset("moeut-tiny").with_overrides(
            [*sets, f"model.init.attn_router_renorm={renorm}"]).model)
        for name, r in m.named_modules():
            if not isinstance(r, Router):
                continue
            norms = r.weight.detach().norm(dim=-1)
            equal = bool(torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-4))
            assert equal == (renorm == "rows" or ".attn." not in f".{name}."), (renorm, name)
    # the rule itself on a known matrix, written out
    from moelab.layers.init import switchhead_renorm_

    torch.manual_seed(1)
    x = torch.randn(6, 10, dtype=torch.float64) * torch.linspace(0.5, 2, 6, dtype=torch.float64)[:, None]
    u = x / x.norm(dim=-1, keepdim=True)
    want = u * x.std(dim=-1, keepdim=True) / u.std()
    assert torch.allclose(switchhead_renorm_(x.clone()), want, atol=1e-12)


def test_umoe_presets_routers_padding_and_aux_scale():
    for name in ("umoe-paper-base-umoe", "umoe-paper-large-moa", "umoe-paper-base-dense"):
        cfg = load_preset(name)
        assert cfg.model.init.router == "kaiming_uniform" and cfg.model.pad_token_id == 32000
        assert cfg.train.aux_loss_scale == "per_micro_batch"
    assert load_preset("umoe-tiny").model.init.router == "normal"  # tiny presets unchanged


def test_kaiming_uniform_router_init():
    d = 32
    for init in ("normal", "kaiming_uniform"):
        torch.manual_seed(0)
        m = MoELM(tiny(*MOE, f"model.init.router={init}").model)
        w = m.layers[0].ffn.router.weight.detach()
        bound = 1 / math.sqrt(d)  # kaiming_uniform(a=sqrt 5) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        if init == "kaiming_uniform":
            assert w.abs().max() <= bound and abs(w.std() - bound / math.sqrt(3)) < 0.02
        else:
            assert abs(w.std() - 0.02) < 0.005
        # the other matrices keep N(0, 0.02)
        assert abs(m.layers[0].attn.q_proj.weight.std() - 0.02) < 0.003


def test_padding_row_is_zero_and_stays_zero():
    from moelab.train.optim import build_optimizer

    cfg = tiny("model.pad_token_id=3", "model.tie_embeddings=false")
    m = MoELM(cfg.model)
    assert torch.equal(m.embed.weight[3], torch.zeros(cfg.model.d_model))
    opt = build_optimizer(m, cfg.train)
    for g in opt.param_groups:
        g["lr"] = 0.1
    x = torch.tensor([[1, 3, 3, 5, 3, 2]])
    for _ in range(2):
        out = m(x, targets_BT=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(m.embed.weight[3], torch.zeros(cfg.model.d_model))
    assert m.embed.weight[5].abs().sum() > 0


def test_pad_token_outside_vocabulary_is_refused():
    from moelab.errors import ConfigError

    with pytest.raises(ConfigError, match="pad_token_id: 97 is outside the vocabulary"):
        tiny("model.pad_token_id=97", "model.tie_embeddings=false")
    with pytest.raises(ConfigError, match="needs an untied head"):
        tiny("model.pad_token_id=3")


@pytest.mark.parametrize("scale", ["mean", "per_micro_batch"])
def test_aux_loss_scale_under_accumulation(scale):
    """per_micro_batch: each micro-batch's balance loss enters with weight 1 (UMoE's
    AddAuxiliaryLoss) while the LM loss is divided by the accumulation steps."""
    from moelab.train.step import train_step

    torch.manual_seed(0)
    cfg = tiny(*MOE).model
    m = MoELM(cfg)
    x = torch.randint(0, 97, (4, 8))
    y = torch.randint(0, 97, (4, 8))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    # reference gradient, written out
    ref = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    for i in range(2):
        out = m(x[2 * i:2 * i + 2], y[2 * i:2 * i + 2])
        aux_w = 1.0 if scale == "per_micro_batch" else 0.5
        grads = torch.autograd.grad(out.loss / 2 + aux_w * out.aux_loss,
                                    [p for _, p in m.named_parameters()], allow_unused=True)
        for (n, _), g in zip(m.named_parameters(), grads):
            if g is not None:
                ref[n] += g
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    train_step(m, opt, x, y, grad_accum=2, aux_per_micro_batch=scale == "per_micro_batch")
    router = "layers.0.ffn.router.weight"
    for n, p in m.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), ref[n], rtol=1e-4, atol=1e-6)
    assert ref[router].abs().sum() > 0
