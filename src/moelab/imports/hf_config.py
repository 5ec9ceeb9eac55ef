"""Hugging Face `config.json` -> moelab `ModelConfig`, one small class per architecture family.

Every field of config.json is either read by the architecture's translator, listed as harmless
metadata (`METADATA`: token ids, dtype, versions, training-only knobs), or refused: a field moelab
does not know could change what the model computes, so it is an error naming the field, never
silently dropped. A field whose value moelab cannot reproduce (a RoPE type, `clip_qkv`, dense
layers between MoE layers, ...) is refused the same way, naming the field and its value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moelab.errors import ConfigError

# Fields that never change the logits of a forward pass in float32.
METADATA = {
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "initializer_range", "use_cache", "output_router_logits", "router_aux_loss_coef",
    "router_z_loss_coef", "router_jitter_noise",  # training-only (jitter: noise in training)
    "attention_dropout", "pretraining_tp", "_name_or_path", "name_or_path", "auto_map",
    "output_attentions", "output_hidden_states", "return_dict", "use_return_dict",
    "tokenizer_class", "is_decoder", "is_encoder_decoder", "add_cross_attention",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "torchscript",
    "tf_legacy_loss", "pruned_heads", "task_specific_params", "prefix", "finetuning_task",
    "cross_attention_hidden_size", "tie_encoder_decoder", "_attn_implementation_autoset",
    "max_window_layers",  # read only through use_sliding_window / layer_types
}
MISSING = object()


class HFConfig:
    """A config.json mapping that records which fields were read."""

    def __init__(self, d: dict, where: str):
        self.d, self.where, self.read = d, where, set()

    def __contains__(self, key: str) -> bool:
        return key in self.d

    def get(self, key: str, default: Any = MISSING) -> Any:
        self.read.add(key)
        if key in self.d and self.d[key] is not None:
            return self.d[key]
        if default is MISSING:
            raise ConfigError(f"{self.where}: field {key!r} is missing")
        return default

    def int(self, key: str, default: Any = MISSING) -> int:
        v = self.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{self.where}: {key}={v!r}, expected a non-negative integer")
        return v

    def int_any(self, keys: tuple[str, ...]) -> int:
        """The first of several spellings of one field (transformers renamed some)."""
        for k in keys:
            if self.d.get(k) is not None:
                return self.int(k)
        raise ConfigError(f"{self.where}: field {keys[0]!r} is missing")

    def expect(self, key: str, allowed: tuple, why: str) -> Any:
        """Refuse a value moelab cannot reproduce (a missing field counts as allowed[0])."""
        v = self.get(key, allowed[0])
        if v not in allowed:
            raise ConfigError(f"{self.where}: {key}={v!r} is not supported by moelab import "
                              f"({why}); supported: {', '.join(repr(a) for a in allowed)}")
        return v

    def refuse_unread(self, arch: str) -> None:
        extra = sorted(k for k in self.d if k not in self.read and k not in METADATA
                       and self.d[k] not in (None, False, [], {}))
        if extra:
            k = extra[0]
            raise ConfigError(f"{self.where}: field {k}={self.d[k]!r} is not supported by "
                              f"moelab import of {arch} (it may change what the model computes)"
                              + (f"; also {', '.join(extra[1:4])}" if len(extra) > 1 else ""))


ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class Family:
    """One transformers architecture family: how its config.json reads and how its layers are
    named in the checkpoint (moelab/imports/hf_weights.py uses the names)."""

    archs: tuple[str, ...]
    moe: str = ""  # "": dense MLP | "mixtral" | "qwen" (mlp.gate/mlp.experts) | "qwen2_moe"
    # biases on q, k, v only: "" none | "always" (Qwen2) | the config field that switches them
    qkv_bias: str = ""
    qk_norm: str = ""  # "" | "head" (Qwen3) | "all" (OLMoE)
    window: str = ""  # "" | "mistral" (sliding_window on every layer) | "qwen" (use_sliding_window)

    def model_config(self, hf: HFConfig, arch: str) -> dict:
        d_model = hf.int("hidden_size")
        n_heads = hf.int("num_attention_heads")
        n_kv = hf.int("num_key_value_heads", n_heads)
        head_dim = hf.int("head_dim", 0) or d_model // n_heads
        act = hf.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ConfigError(f"{hf.where}: hidden_act={act!r} is not supported by moelab "
                              f"import; supported: {', '.join(ACTIVATIONS)}")
        attn = {"kind": "dense", "n_heads": n_heads, "n_kv_heads": n_kv, "head_dim": head_dim,
                **rope_fields(hf), **self.bias_fields(hf), **self.qk_norm_fields(hf),
                "sliding_window": self.window_size(hf)}
        attn.update(gate_fields(hf, arch))
        m = {"vocab_size": hf.int("vocab_size"), "d_model": d_model,
             "n_layers": hf.int("num_hidden_layers"),
             "max_seq_len": hf.int("max_position_embeddings", 4096),
             "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
             "attention": attn,
             "norm": {"kind": "rmsnorm", "eps": float(hf.get("rms_norm_eps", 1e-6)),
                      "scheme": "pre"}}
        m["ffn"], m["router"] = self.ffn_fields(hf, ACTIVATIONS[act])
        return m

    def bias_fields(self, hf: HFConfig) -> dict:
        if self.qkv_bias:  # Qwen2 family: q, k, v biased (always, or by a field)
            qkv = True if self.qkv_bias == "always" else bool(hf.get(self.qkv_bias, True))
            return {"bias": False, "qkv_bias": qkv}
        if "qkv_bias" in hf:  # the gated-attention paper's Qwen3: q, k, v and o (its code)
            hf.get("attention_bias", False)  # present in its config, unused by its code
            return {"bias": bool(hf.get("qkv_bias")), "qkv_bias": False}
        return {"bias": bool(hf.get("attention_bias", False)), "qkv_bias": False}

    def qk_norm_fields(self, hf: HFConfig) -> dict:
        if self.qk_norm == "all":
            hf.expect("clip_qkv", (None,), "clipping q, k, v is not implemented")
        use = bool(hf.get("use_qk_norm", True)) if self.qk_norm else False
        return {"qk_norm": use, "qk_norm_scope": self.qk_norm or "head"}

    def window_size(self, hf: HFConfig) -> int:
        if self.window == "mistral":
            return hf.int("sliding_window", 0)
        if self.window == "qwen":
            types = hf.get("layer_types", None)
            use = bool(hf.get("use_sliding_window", False))
            size = hf.int("sliding_window", 0)
            if types is not None:
                kinds = set(types)
                if len(kinds) > 1:
                    raise ConfigError(f"{hf.where}: layer_types mixes {sorted(kinds)}: moelab "
                                      "gives every layer the same attention (sliding window on "
                                      "some layers only is not supported)")
                if kinds == {"sliding_attention"}:
                    return hf.int("sliding_window")
                return 0
            if use and hf.int("max_window_layers", 0) > 0:
                raise ConfigError(f"{hf.where}: use_sliding_window with max_window_layers="
                                  f"{hf.get('max_window_layers')} (a window on some layers only) "
                                  "is not supported")
            return size if use else 0
        return 0

    def ffn_fields(self, hf: HFConfig, act: str) -> tuple[dict, dict]:
        mlp_bias = bool(hf.get("mlp_bias", False))
        if not self.moe:
            return ({"kind": "dense", "d_ff": hf.int("intermediate_size"), "activation": act,
                     "gated": True, "bias": mlp_bias}, {})
        if self.moe == "mixtral":
            n = hf.int_any(("num_local_experts", "num_experts"))
            k, width = hf.int("num_experts_per_tok"), hf.int("intermediate_size")
            renorm = True  # Mixtral: softmax, top-k, renormalised over the k
        else:
            n = hf.int_any(("num_experts", "num_local_experts"))
            k = hf.int("num_experts_per_tok")
            width = hf.int("moe_intermediate_size", 0) or hf.int("intermediate_size")
            renorm = bool(hf.get("norm_topk_prob", False))
            hf.expect("decoder_sparse_step", (1,), "every layer must be a MoE layer")
            only = hf.get("mlp_only_layers", [])
            if only:
                raise ConfigError(f"{hf.where}: mlp_only_layers={only!r} is not supported by "
                                  "moelab import (every layer must be a MoE layer)")
            hf.get("intermediate_size", 0)  # Qwen-MoE: the width of dense layers (none here)
        ffn = {"kind": "moe", "n_experts": n, "top_k": k, "expert_dim": width,
               "activation": act, "gated": True, "bias": mlp_bias}
        if self.moe == "qwen2_moe":
            shared = hf.int("shared_expert_intermediate_size", 0)
            if shared:
                ffn.update({"n_shared_experts": 1, "shared_expert_dim": shared,
                            "shared_gate": True})
        return ffn, {"kind": "softmax_topk", "renormalize": renorm}


def rope_fields(hf: HFConfig) -> dict:
    """RoPE theta, rotated fraction and scaling from `rope_parameters` (transformers 5) or
    `rope_theta` / `rope_scaling` / `partial_rotary_factor` (transformers 4)."""
    p = dict(hf.get("rope_parameters", {}) or {})
    if p and all(isinstance(v, dict) for v in p.values()):
        raise ConfigError(f"{hf.where}: rope_parameters per layer type ({', '.join(p)}) is not "
                          "supported by moelab import (every layer uses one RoPE)")
    p.update(hf.get("rope_scaling", {}) or {})
    theta = float(hf.get("rope_theta", p.get("rope_theta", 10000.0)))
    fraction = float(p.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{hf.where}: rope_parameters.rope_type={kind!r} is not supported by "
                          f"moelab import; supported: {', '.join(ROPE_TYPES)}")
    out = {"rope_theta": theta, "rope_fraction": fraction}
    if kind == "linear":
        out["rope_scaling"] = {"kind": "linear", "factor": float(p["factor"])}
    elif kind == "llama3":
        out["rope_scaling"] = {"kind": "llama3", "factor": float(p["factor"]),
                               "low_freq_factor": float(p["low_freq_factor"]),
                               "high_freq_factor": float(p["high_freq_factor"]),
                               "original_max_seq_len": int(p["original_max_position_embeddings"])}
    known = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor",
             "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    extra = sorted(set(p) - known)
    if extra:
        raise ConfigError(f"{hf.where}: rope_parameters.{extra[0]}={p[extra[0]]!r} is not "
                          "supported by moelab import")
    return out


def gate_fields(hf: HFConfig, arch: str) -> dict:
    """The gated-attention paper's Qwen3 (its modeling_qwen3.py): a sigmoid gate on each head's
    SDPA output (G1), its weights fused into q_proj per KV group, headwise or elementwise."""
    head = bool(hf.get("headwise_attn_output_gate", False))
    elem = bool(hf.get("elementwise_attn_output_gate", False))
    if (head or elem) and not arch.startswith("Qwen3"):
        raise ConfigError(f"{hf.where}: headwise/elementwise_attn_output_gate are read for "
                          f"Qwen3ForCausalLM (the gated-attention paper's code), not {arch}")
    if head:  # the paper's code checks headwise first
        return {"gate": {"position": "sdpa", "granularity": "headwise"}}
    if elem:
        return {"gate": {"position": "sdpa", "granularity": "elementwise"}}
    return {}


FAMILIES = [
    Family(("LlamaForCausalLM",)),
    Family(("MistralForCausalLM",), window="mistral"),
    Family(("Qwen2ForCausalLM",), qkv_bias="always", window="qwen"),
    Family(("Qwen3ForCausalLM",), qk_norm="head", window="qwen"),
    Family(("MixtralForCausalLM",), moe="mixtral", window="mistral"),
    Family(("OlmoeForCausalLM",), moe="qwen", qk_norm="all"),
    Family(("Qwen2MoeForCausalLM",), moe="qwen2_moe", qkv_bias="qkv_bias", window="qwen"),
    Family(("Qwen3MoeForCausalLM",), moe="qwen3_moe", qk_norm="head", window="qwen"),
]
ARCHITECTURES = {a: f for f in FAMILIES for a in f.archs}


def family_of(hf: HFConfig) -> tuple[str, Family]:
    archs = hf.get("architectures", None)
    if not isinstance(archs, list) or len(archs) != 1:
        raise ConfigError(f"{hf.where}: architectures={archs!r}, expected one of "
                          f"{', '.join(ARCHITECTURES)}")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{hf.where}: architectures=[{arch!r}] is not supported by moelab "
                          f"import; supported: {', '.join(ARCHITECTURES)}")
    return arch, ARCHITECTURES[arch]


def translate(d: dict, where: str) -> tuple[str, Family, dict]:
    """(architecture, family, moelab model-config dict) of a config.json mapping."""
    hf = HFConfig(d, where)
    arch, fam = family_of(hf)
    m = fam.model_config(hf, arch)
    hf.refuse_unread(arch)
    return arch, fam, m
