"""Layer sharing (MoEUT groups) and peri-layernorm placement."""
import torch

from helpers import tiny
from moelab.layers.base import ForwardContext
from moelab.model import MoELM

SIGMA = ["model.ffn.kind=sigma_moe", "model.ffn.n_experts=8", "model.ffn.top_k=2",
         "model.ffn.expert_dim=8", "model.ffn.activation=relu", "model.ffn.gated=false",
         "model.router.kind=sigmoid_topk", "model.router.entropy_coef=0.01"]


def test_shared_layers_share_storage_and_accumulate_gradients():
    torch.manual_seed(0)
    shared = MoELM(tiny("model.n_layers=4", "model.sharing.group_size=2", *SIGMA).model)
    plain = MoELM(tiny("model.n_layers=4", *SIGMA).model)
    assert len(shared.layers) == 2
    n_block = sum(p.numel() for p in shared.layers[0].parameters())
    assert shared.num_params() == plain.num_params() - 2 * n_block
    # copy the two shared blocks into the four unshared positions (ABAB)
    with torch.no_grad():
        plain.embed.weight.copy_(shared.embed.weight)
        plain.norm.load_state_dict(shared.norm.state_dict())
        for i in range(4):
            plain.layers[i].load_state_dict(shared.layers[i % 2].state_dict())
    x = torch.randint(0, 97, (2, 10))
    out_s, out_p = shared(x, x), plain(x, x)
    assert torch.allclose(out_s.logits, out_p.logits, atol=1e-6)
    out_s.loss.backward()
    out_p.loss.backward()
    for (name, p_s) in shared.layers[0].named_parameters():
        p0 = dict(plain.layers[0].named_parameters())[name]
        p2 = dict(plain.layers[2].named_parameters())[name]
        assert torch.allclose(p_s.grad, p0.grad + p2.grad, atol=1e-6), name


def test_entropy_loss_is_one_per_shared_router_pooled_over_repeats():
    torch.manual_seed(0)
    m = MoELM(tiny("model.n_layers=4", "model.sharing.group_size=2", *SIGMA).model)
    out = m(torch.randint(0, 97, (2, 6)))
    entropy_keys = sorted(k for k in out.aux_losses if k.endswith(".entropy"))
    assert entropy_keys == ["layer0.ffn_router.entropy", "layer1.ffn_router.entropy"]


def test_peri_ln_norms_only_softmax_and_sigmoid_inputs():
    """Peri-LN: queries, keys, gates and routers read a normed input; values and experts the raw
    residual; the block adds no norm on the residual path; a final norm precedes the head."""
    torch.manual_seed(0)
    m = MoELM(tiny("model.norm.scheme=peri", "model.attention.gate.position=sdpa", *SIGMA).model)
    blk = m.layers[0]
    assert isinstance(blk.attn_norm, torch.nn.Identity) and isinstance(blk.ffn_norm, torch.nn.Identity)
    seen = {}

    def grab(name):
        return lambda mod, args: seen.__setitem__(name, args[0].detach())

    blk.attn.q_proj.register_forward_pre_hook(grab("q"))
    blk.attn.k_proj.register_forward_pre_hook(grab("k"))
    blk.attn.v_proj.register_forward_pre_hook(grab("v"))
    blk.ffn.router.register_forward_pre_hook(grab("router"))
    x = 5.0 * torch.randn(1, 6, 32)
    blk(x, None, 0, ForwardContext())

    def unit_rms(t):
        return torch.allclose(t.pow(2).mean(-1).sqrt(), torch.ones(t.shape[:-1]), atol=1e-3)

    assert unit_rms(seen["q"]) and unit_rms(seen["k"]) and unit_rms(seen["router"])
    assert torch.equal(seen["v"], x)  # values read the raw residual stream
    assert not unit_rms(seen["v"])
    assert isinstance(m.norm, torch.nn.RMSNorm)  # final norm before the head
