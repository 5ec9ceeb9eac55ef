"""Small model configs shared by the tests."""
from moelab.config import Config, load_preset

ATTENTION_OPTIONS = {
    "mha": [],
    "gqa": ["model.attention.n_kv_heads=2"],
    "mqa": ["model.attention.n_kv_heads=1"],
    "qk_norm": ["model.attention.qk_norm=true"],
    "g1_headwise": ["model.attention.gate.position=sdpa", "model.attention.gate.granularity=headwise"],
    "g1_elementwise": ["model.attention.gate.position=sdpa"],
    "g2_headwise": ["model.attention.gate.position=value", "model.attention.gate.granularity=headwise",
                    "model.attention.n_kv_heads=2"],
    "g2_elementwise": ["model.attention.gate.position=value"],
    "rope_half": ["model.attention.rope_fraction=0.5"],
    "no_rope": ["model.attention.rope_fraction=0.0"],
    "gqa_gated_rope_quarter": ["model.attention.n_kv_heads=2", "model.attention.gate.position=sdpa",
                               "model.attention.rope_fraction=0.25", "model.attention.qk_norm=true"],
    "layernorm_bias": ["model.norm.kind=layernorm", "model.attention.bias=true", "model.ffn.bias=true"],
    "peri_ln": ["model.norm.scheme=peri"],
    "gelu_mlp_untied": ["model.ffn.gated=false", "model.ffn.activation=gelu", "model.tie_embeddings=false"],
    # options for imported checkpoints (moelab import hf)
    "sliding_window": ["model.attention.sliding_window=4", "model.attention.n_kv_heads=2"],
    "qkv_bias": ["model.attention.qkv_bias=true"],
    "qk_norm_all_heads": ["model.attention.qk_norm=true", "model.attention.qk_norm_scope=all",
                          "model.attention.n_kv_heads=2"],
    "rope_llama3": ["model.attention.rope_scaling.kind=llama3", "model.attention.rope_scaling.factor=8",
                    "model.attention.rope_scaling.original_max_seq_len=16"],
    "rope_linear": ["model.attention.rope_scaling.kind=linear", "model.attention.rope_scaling.factor=4"],
}


def tiny(*sets: str, base: str = "dense-tiny") -> Config:
    """A very small model (d 32, 2 layers, vocab 97) for fast exact tests."""
    return load_preset(base).with_overrides(
        ["model.vocab_size=97", "model.d_model=32", "model.n_layers=2", "model.attention.n_heads=4",
         "model.ffn.d_ff=48", "model.max_seq_len=64", "train.seq_len=32", *sets])


def sharpened_model(*sets: str):
    """A tiny MoELM in eval mode whose matrices are 8x the init, so attention patterns (and
    routing) are far from uniform and a causality or cache bug cannot hide in averaging."""
    import torch

    from moelab.model import MoELM

    torch.manual_seed(0)
    m = MoELM(tiny(*sets).model).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    return m


def assert_matches_reference(layer, reference, x, ctx=None, router_tol: float = 1e-5):
    """`layer(x)` against `reference(layer, x)` (an explicit float64 loop) for the output and
    the gradients of the input and of every parameter. Router parameters get their gradient
    through float32 logits, hence their looser tolerance."""
    import torch

    from moelab.layers.base import ForwardContext

    x = x.detach().clone().requires_grad_(True)
    y = layer(x, None, 0, ctx if ctx is not None else ForwardContext())
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference(layer, x_ref)
    assert torch.allclose(y, y_ref, rtol=1e-9, atol=1e-10)
    g = torch.randn_like(y)
    names, params = zip(*layer.named_parameters())
    grads = torch.autograd.grad(y, [x, *params], g)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *params], g)
    for name, a, b in zip(("x",) + names, grads, grads_ref):
        tol = router_tol if "router" in name else 1e-9
        assert torch.allclose(a, b, rtol=tol, atol=tol), name


def assert_causal_and_cached(m, seq: int = 15, tol: float = 1e-5):
    """Changing token t+1 leaves logits up to t unchanged (within `tol`: routing changes which
    rows share an expert matmul, so equal up to rounding, not bitwise) and changes t+1; decoding
    in chunks and single tokens with a KV cache equals the full forward. Returns the cache."""
    import torch

    x = torch.randint(0, m.config.vocab_size, (2, seq))
    full = m(x).logits
    for t in (0, seq // 3, 2 * seq // 3):
        y = x.clone()
        y[:, t + 1] = (y[:, t + 1] + 1 + torch.arange(2)) % m.config.vocab_size
        out = m(y).logits
        assert (out[:, : t + 1] - full[:, : t + 1]).abs().max() <= tol
        assert not torch.allclose(out[:, t + 1], full[:, t + 1])
    cache = m.new_cache()
    a, b = seq * 2 // 5, seq * 2 // 3
    parts = [m(x[:, :a], cache=cache).logits, m(x[:, a:b], cache=cache).logits]
    parts += [m(x[:, t:t + 1], cache=cache).logits for t in range(b, seq)]
    assert (torch.cat(parts, 1) - full).abs().max() <= tol
    return cache


def assert_counts_match(cfg, batch: int = 2, seq: int = 12, rel: float = 0.02):
    """flops.count's parameters equal the module's, and its forward MACs match PyTorch's
    FlopCounterMode (math SDPA, full attention) within `rel`."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from moelab.flops import count
    from moelab.model import MoELM

    m = MoELM(cfg)
    res = count(cfg, batch=batch, seq_len=seq, full_attention=True)
    assert res["params_total"] == sum(p.numel() for p in m.parameters())
    x = torch.randint(0, cfg.vocab_size, (batch, seq))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        m(x)
    measured = fc.get_total_flops() / 2
    assert abs(res["macs_forward"] - measured) / measured < rel
    return res


def assert_greedy_equal(got_BT, want_BT, model, tie_tol: float = 1e-4) -> None:
    """Two greedy continuations of the same prompt are equal, or part only at a near tie.

    Two equally valid computations of the same logits (cached vs full forward, another batching
    of the routed experts, another CPU's matmul kernels) can differ in the last bits. Where the
    model's two best next tokens are closer than that, either may win, and the continuations
    diverge from there on. So at the first differing position of each row, the model's own full
    forward over the common prefix must score both tokens within `tie_tol` (relative to the
    largest logit); a broken cache or mask shows up as a far larger gap.
    """
    import torch

    assert got_BT.shape == want_BT.shape, (got_BT.shape, want_BT.shape)
    for b in range(want_BT.shape[0]):
        diff = (got_BT[b] != want_BT[b]).nonzero()
        if len(diff) == 0:
            continue
        t = int(diff[0])
        with torch.no_grad():
            logits = model(want_BT[b:b + 1, :t]).logits[0, -1].double()
        gap = (logits[got_BT[b, t]] - logits[want_BT[b, t]]).abs().item()
        scale = max(1.0, logits.abs().max().item())
        assert gap <= tie_tol * scale, (
            f"row {b}: greedy outputs differ at position {t} ({int(got_BT[b, t])} vs "
            f"{int(want_BT[b, t])}) where the logits are {gap:.3g} apart, not a near tie")


def small_tokenizer(directory, vocab: int):
    """A byte-level BPE of `vocab` tokens trained on the bundled corpus's test documents (cut to
    20,000 characters each), saved as directory/tokenizer.json; returns that path."""
    from pathlib import Path

    from moelab.data.corpus import TEST_TITLES, load_default_corpus
    from moelab.data.tokenizer import train_bpe

    path = Path(directory) / "tokenizer.json"
    docs = [d["text"][:20000] for d in load_default_corpus() if d["title"] in TEST_TITLES]
    train_bpe(docs, vocab).save(path)
    return path
