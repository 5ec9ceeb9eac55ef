"""transformers config of an exported moelab model (written by `moelab export hf`).

moelab's own `ModelConfig` is kept whole under one key, `moelab_config`: transformers reads some
top-level names (`top_k`, `temperature`, ...) as generation settings, and moelab's attention and
FFN sections use `top_k` for routing. The standard names transformers and lm-eval look for
(vocab_size, hidden_size, num_hidden_layers, max_position_embeddings, tie_word_embeddings) are
copies derived from it.
"""
from transformers import PretrainedConfig


class MoelabConfig(PretrainedConfig):
    model_type = "moelab"

    def __init__(self, moelab_config=None, **kwargs):
        self.moelab_config = dict(moelab_config or {})
        self.use_cache = kwargs.pop("use_cache", True)  # not a base-class field in transformers 5
        m = self.moelab_config
        kwargs.setdefault("vocab_size", m.get("vocab_size", 0))
        kwargs.setdefault("hidden_size", m.get("d_model", 0))
        kwargs.setdefault("num_hidden_layers", m.get("n_layers", 0))
        kwargs.setdefault("max_position_embeddings", m.get("max_seq_len", 0))
        kwargs.setdefault("tie_word_embeddings", m.get("tie_embeddings", True))
        super().__init__(**kwargs)
