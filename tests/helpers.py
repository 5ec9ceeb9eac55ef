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
}


def tiny(*sets: str, base: str = "dense-tiny") -> Config:
    """A very small model (d 32, 2 layers, vocab 97) for fast exact tests."""
    return load_preset(base).with_overrides(
        ["model.vocab_size=97", "model.d_model=32", "model.n_layers=2", "model.attention.n_heads=4",
         "model.ffn.d_ff=48", "model.max_seq_len=64", "train.seq_len=32", *sets])
