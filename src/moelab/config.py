"""One config for every moelab model, plus training and data settings.

`Config` = `ModelConfig` + `TrainConfig` + `DataConfig`. `ModelConfig` is made of small parts
(attention, ffn, router, sharing, norm, init), each a dataclass with its own `validate()`.
Configs load from and save to YAML or JSON; named presets live in `moelab/presets/*.yaml`.

Every mistake a user can make raises `ConfigError` naming the field (dotted path), the value and
what is allowed; an unknown key also names the closest valid key (the parsing and checks are
in `moelab/config_parsing.py`).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional

import yaml

from moelab.config_parsing import (build, check_choice, check_kind, check_non_negative,
                                   check_positive, divisors, read_mapping, set_dotted)
from moelab.cpu_memory import CPU_ALLOCATORS
from moelab.errors import ConfigError

ACTIVATIONS = ("silu", "gelu", "relu")
GATE_POSITIONS = ("none", "sdpa", "value")  # none, G1 (per-head SDPA output), G2 (after W_v)
GATE_GRANULARITIES = ("headwise", "elementwise")
NORM_SCHEMES = ("pre", "peri")
INIT_SCHEMES = ("normal", "depth_scaled", "moeut")
ROUTER_INITS = ("normal", "kaiming_uniform")
ATTN_ROUTER_RENORMS = ("rows", "switchhead")
AUX_LOSS_SCALES = ("mean", "per_micro_batch")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALINGS = ("none", "linear", "llama3")
QK_NORM_SCOPES = ("head", "all")  # per head (Qwen3), or over all heads' width at once (OLMoE)
MOE_BACKENDS = ("auto", "loop", "grouped_mm", "padded", "triton", "scatter")


# --------------------------------------------------------------------------------------------
# model parts
# --------------------------------------------------------------------------------------------
@dataclass
class GateConfig:
    """Gated attention (arXiv 2505.06708): Y' = Y * sigmoid(X W_theta), Eq. 5."""

    position: str = "none"  # "sdpa" = G1 (best in the paper), "value" = G2
    granularity: str = "elementwise"  # "headwise" = one scalar per head

    def validate(self, p: str) -> None:
        check_choice(p + ".position", self.position, GATE_POSITIONS)
        check_choice(p + ".granularity", self.granularity, GATE_GRANULARITIES)


@dataclass
class RopeScalingConfig:
    """Stretching RoPE to longer contexts, as released checkpoints configure it.

    - `linear` (position interpolation): every frequency divided by `factor`.
    - `llama3` (Llama 3.1): wavelengths above original_max_seq_len / low_freq_factor are
      divided by `factor`, those below original_max_seq_len / high_freq_factor are kept, and
      the band between is interpolated smoothly.
    """

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def validate(self, p: str) -> None:
        check_choice(p + ".kind", self.kind, ROPE_SCALINGS)
        check_positive(p + ".factor", self.factor)
        check_positive(p + ".original_max_seq_len", self.original_max_seq_len)
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ConfigError(f"{p}.high_freq_factor: {self.high_freq_factor} must be above "
                              f"low_freq_factor={self.low_freq_factor} > 0")


@dataclass
class AttentionConfig:
    kind: str = "dense"
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None = n_heads (MHA); 1 = MQA; in between = GQA
    head_dim: Optional[int] = None  # None = d_model // n_heads
    qk_norm: bool = False
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # fraction of each head's dims that are rotated; 0 = no RoPE
    bias: bool = False  # biases on the q, k, v and output projections (Llama attention_bias)
    qkv_bias: bool = False  # biases on q, k and v only (Qwen2)
    qk_norm_scope: str = "head"  # head: over each head's dims | all: over all heads (OLMoE)
    sliding_window: int = 0  # a query sees the last `sliding_window` keys (itself included); 0 = all
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    # attention experts (SwitchHead, MoA, UMoE-Att); ignored by the dense kind
    n_experts: int = 0
    top_k: int = 0
    n_shared_experts: int = 0
    expert_dim: Optional[int] = None  # width of an attention expert (d_v); None = head_dim
    q_rank: int = 0  # UMoE low-rank expert query rank r
    router_kind: Optional[str] = None  # attention routers' kind; None = the kind's default
    entropy_coef: Optional[float] = None  # attention routers' entropy coefficient (MoEUT: 0.001)

    def validate(self, p: str, d_model: int) -> None:
        check_kind(p + ".kind", self.kind, "ATTENTION")
        check_positive(p + ".n_heads", self.n_heads)
        kv = self.kv_heads
        check_positive(p + ".n_kv_heads", kv)
        if self.n_heads % kv:
            raise ConfigError(
                f"{p}.n_kv_heads: {kv} must divide n_heads={self.n_heads} "
                f"(allowed: {', '.join(str(k) for k in divisors(self.n_heads))})"
            )
        if self.head_dim is None and d_model % self.n_heads:
            raise ConfigError(
                f"{p}.n_heads: {self.n_heads} does not divide model.d_model={d_model}; "
                f"choose a divisor of {d_model} or set {p}.head_dim"
            )
        if self.head_dim is not None:
            check_positive(p + ".head_dim", self.head_dim)
        if not (0.0 <= self.rope_fraction <= 1.0):
            raise ConfigError(f"{p}.rope_fraction: {self.rope_fraction} must be in [0, 1]")
        check_positive(p + ".rope_theta", self.rope_theta)
        check_choice(p + ".qk_norm_scope", self.qk_norm_scope, QK_NORM_SCOPES)
        check_non_negative(p + ".sliding_window", self.sliding_window)
        self.rope_scaling.validate(p + ".rope_scaling")
        if self.kind != "dense":  # only the dense kind implements these (imported checkpoints)
            for name, off in (("qkv_bias", False), ("qk_norm_scope", "head"),
                              ("sliding_window", 0)):
                if getattr(self, name) != off:
                    raise ConfigError(f"{p}.{name}: {getattr(self, name)!r} is implemented for "
                                      f"attention.kind 'dense' only, not {self.kind!r}")
            if self.rope_scaling.kind != "none":
                raise ConfigError(f"{p}.rope_scaling.kind: {self.rope_scaling.kind!r} is "
                                  f"implemented for attention.kind 'dense' only, not {self.kind!r}")
        self.gate.validate(p + ".gate")
        check_non_negative(p + ".n_experts", self.n_experts)
        check_non_negative(p + ".top_k", self.top_k)
        check_non_negative(p + ".n_shared_experts", self.n_shared_experts)
        check_non_negative(p + ".q_rank", self.q_rank)
        if self.expert_dim is not None:
            check_positive(p + ".expert_dim", self.expert_dim)
        if self.router_kind is not None:
            check_kind(p + ".router_kind", self.router_kind, "ROUTER")
        if self.entropy_coef is not None:
            check_non_negative(p + ".entropy_coef", self.entropy_coef)
        if self.n_experts and self.top_k > self.n_experts:
            raise ConfigError(
                f"{p}.top_k: {self.top_k} is above n_experts={self.n_experts} "
                f"(allowed: 1..{self.n_experts})"
            )

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def dim_per_head(self, d_model: int) -> int:
        return self.head_dim if self.head_dim is not None else d_model // self.n_heads


@dataclass
class FFNConfig:
    kind: str = "dense"
    d_ff: int = 1024  # hidden width of the dense FFN (and of shared experts unless set)
    activation: str = "silu"
    gated: bool = True  # silu + gated = SwiGLU
    bias: bool = False
    # routed experts (moe, sigma_moe, mole); ignored by the dense kind
    n_experts: int = 0
    top_k: int = 0
    expert_dim: int = 128
    n_shared_experts: int = 0
    shared_expert_dim: Optional[int] = None  # None = expert_dim
    shared_gate: bool = False  # Qwen2-MoE: shared experts' output times sigmoid(x w), w: d -> 1
    expert_dropout: float = 0.0  # sigma-MoE: drop whole experts from the router's choice
    # Switch/GShard capacity in training (0 = dropless): an expert takes at most
    # ceil(capacity_factor * tokens * top_k / n_experts) pairs of a micro-batch; the rest drop
    capacity_factor: float = 0.0
    drop_policy: str = "position"  # position: later tokens drop first | score: lowest gates first

    def validate(self, p: str) -> None:
        check_kind(p + ".kind", self.kind, "FFN")
        check_non_negative(p + ".capacity_factor", self.capacity_factor)
        check_choice(p + ".drop_policy", self.drop_policy, ("position", "score"))
        if self.capacity_factor and self.kind not in ("moe", "sigma_moe", "umoe_ffn"):
            raise ConfigError(f"{p}.capacity_factor: {self.capacity_factor} applies to routed "
                              f"top-k experts (moe, sigma_moe, umoe_ffn), not {self.kind!r}; "
                              "set it to 0")
        check_positive(p + ".d_ff", self.d_ff)
        check_choice(p + ".activation", self.activation, ACTIVATIONS)
        check_non_negative(p + ".n_experts", self.n_experts)
        check_non_negative(p + ".top_k", self.top_k)
        check_positive(p + ".expert_dim", self.expert_dim)
        check_non_negative(p + ".n_shared_experts", self.n_shared_experts)
        if self.shared_expert_dim is not None:
            check_positive(p + ".shared_expert_dim", self.shared_expert_dim)
        if self.shared_gate and not (self.kind == "moe" and self.n_shared_experts):
            raise ConfigError(f"{p}.shared_gate: true needs ffn.kind 'moe' with "
                              f"n_shared_experts >= 1 (got kind {self.kind!r}, "
                              f"n_shared_experts {self.n_shared_experts})")
        if self.n_experts and self.top_k > self.n_experts:
            raise ConfigError(
                f"{p}.top_k: {self.top_k} is above n_experts={self.n_experts} "
                f"(allowed: 1..{self.n_experts})"
            )
        if not (0.0 <= self.expert_dropout < 1.0):
            raise ConfigError(f"{p}.expert_dropout: {self.expert_dropout} must be in [0, 1)")


@dataclass
class RouterConfig:
    """Router choice and balance-loss coefficients (0 disables a loss)."""

    kind: str = "softmax_topk"  # softmax_topk | sigmoid_topk | softmax_dense
    renormalize: bool = False  # renormalise the top-k softmax weights to sum to 1
    jitter: float = 0.0  # multiplicative input noise in training (Switch Transformer)
    switch_coef: float = 0.0  # Switch: E * sum_e f_e * P_e
    seq_coef: float = 0.0  # DeepSeek sequence-level loss (UMoE: 0.001)
    entropy_coef: float = 0.0  # MoEUT entropy regulariser
    z_coef: float = 0.0  # router z-loss
    # aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores only to choose
    # experts, moved by bias_rate * sign(mean load - load) after every optimizer step; 0 = off
    bias_rate: float = 0.0

    def validate(self, p: str) -> None:
        check_kind(p + ".kind", self.kind, "ROUTER")
        for name in ("jitter", "switch_coef", "seq_coef", "entropy_coef", "z_coef", "bias_rate"):
            check_non_negative(f"{p}.{name}", getattr(self, name))


@dataclass
class SharingConfig:
    """MoEUT layer grouping: `group_size` distinct layers repeated n_layers / group_size times."""

    group_size: int = 0  # 0 = no sharing (every layer distinct)

    def validate(self, p: str, n_layers: int) -> None:
        check_non_negative(p + ".group_size", self.group_size)
        if self.group_size and n_layers % self.group_size:
            raise ConfigError(
                f"{p}.group_size: {self.group_size} must divide model.n_layers={n_layers} "
                f"(allowed: {', '.join(str(k) for k in divisors(n_layers))})"
            )


@dataclass
class NormConfig:
    kind: str = "rmsnorm"  # rmsnorm | layernorm
    eps: float = 1e-6
    scheme: str = "pre"  # pre-LN, or MoEUT's peri-LN

    def validate(self, p: str) -> None:
        check_kind(p + ".kind", self.kind, "NORM")
        check_positive(p + ".eps", self.eps)
        check_choice(p + ".scheme", self.scheme, NORM_SCHEMES)


@dataclass
class InitConfig:
    scheme: str = "normal"  # normal | depth_scaled | moeut (see moelab/layers/init.py)
    std: float = 0.02
    # normal/depth_scaled: router matrices N(0, std), or PyTorch's nn.Linear default
    # (kaiming-uniform, a=sqrt(5)), which UMoE's official routers keep
    router: str = "normal"
    # moeut: attention (SwitchHead) routers' rows to one common norm, or the official SwitchHead
    # rescaling (each row by its own std over its norm, then the whole matrix by one factor)
    attn_router_renorm: str = "rows"

    def validate(self, p: str) -> None:
        check_choice(p + ".scheme", self.scheme, INIT_SCHEMES)
        check_positive(p + ".std", self.std)
        check_choice(p + ".router", self.router, ROUTER_INITS)
        check_choice(p + ".attn_router_renorm", self.attn_router_renorm, ATTN_ROUTER_RENORMS)


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    max_seq_len: int = 1024
    tie_embeddings: bool = True
    head_bias: bool = False  # a bias on the LM head (MoEUT's lm_head is a biased nn.Linear)
    # a padding token whose embedding row is zero and never trained (UMoE's [PAD]); None = none
    pad_token_id: Optional[int] = None
    moe_backend: str = "auto"  # routed-experts engine backend
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    norm: NormConfig = field(default_factory=NormConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def validate(self, p: str = "model") -> "ModelConfig":
        check_positive(p + ".vocab_size", self.vocab_size)
        check_positive(p + ".d_model", self.d_model)
        check_positive(p + ".n_layers", self.n_layers)
        check_positive(p + ".max_seq_len", self.max_seq_len)
        check_choice(p + ".moe_backend", self.moe_backend, MOE_BACKENDS)
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ConfigError(f"{p}.pad_token_id: {self.pad_token_id} is outside the vocabulary "
                              f"(0..{self.vocab_size - 1})")
        if self.pad_token_id is not None and self.tie_embeddings:
            raise ConfigError(f"{p}.pad_token_id: a frozen padding row needs an untied head "
                              f"(the head's gradient would train it); set "
                              f"{p}.tie_embeddings=false")
        self.attention.validate(p + ".attention", self.d_model)
        self.ffn.validate(p + ".ffn")
        self.router.validate(p + ".router")
        self.sharing.validate(p + ".sharing", self.n_layers)
        self.norm.validate(p + ".norm")
        self.init.validate(p + ".init")
        check_kinds(self)
        return self

    @property
    def n_distinct_layers(self) -> int:
        return self.sharing.group_size or self.n_layers

    @property
    def head_dim(self) -> int:
        return self.attention.dim_per_head(self.d_model)


# --------------------------------------------------------------------------------------------
# training and data
# --------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # sequences per optimizer step (global, before accumulation split)
    seq_len: int = 256
    grad_accum: int = 1
    # the balance (aux) losses under accumulation: "mean" divides them by grad_accum like the LM
    # loss; "per_micro_batch" adds each micro-batch's with weight 1, as UMoE's official training
    # does (its AddAuxiliaryLoss), which makes the effective coefficient grad_accum x the config's
    aux_loss_scale: str = "mean"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    decay_norms_and_embeddings: bool = False
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    dtype: str = "float32"  # autocast dtype: float32 (off) | bfloat16 | float16
    compile: bool = False
    # CPU runs: "reuse" keeps large freed blocks mapped between steps (moelab/cpu_memory.py:
    # no page faults on the expert gradients each step), "system" leaves malloc as it is
    cpu_allocator: str = "reuse"
    parallel: str = "ddp"  # under torchrun: ddp | fsdp (FSDP2 fully_shard) | ep (experts split)
    ep_size: int = 0  # parallel ep: processes one expert bank is split over (0 = all of them)
    seed: int = 0
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 8
    save_every: int = 200  # 0 = only at the end
    keep_last: int = 2
    log_every: int = 1

    def validate(self, p: str = "train") -> "TrainConfig":
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_last"):
            check_positive(f"{p}.{name}", getattr(self, name))
        for name in ("warmup_steps", "weight_decay", "grad_clip", "eval_every", "save_every",
                     "min_lr_ratio", "log_every", "ep_size"):
            check_non_negative(f"{p}.{name}", getattr(self, name))
        check_positive(p + ".lr", self.lr)
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"{p}.grad_accum: {self.grad_accum} must divide train.batch_size={self.batch_size}"
            )
        if self.min_lr_ratio > 1:
            raise ConfigError(f"{p}.min_lr_ratio: {self.min_lr_ratio} must be in [0, 1]")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ConfigError(f"{p}.{name}: {v} must be in [0, 1)")
        check_choice(p + ".dtype", self.dtype, DTYPES)
        check_choice(p + ".aux_loss_scale", self.aux_loss_scale, AUX_LOSS_SCALES)
        check_choice(p + ".parallel", self.parallel, ("ddp", "fsdp", "ep"))
        check_choice(p + ".cpu_allocator", self.cpu_allocator, CPU_ALLOCATORS)
        return self


@dataclass
class DataConfig:
    dir: Optional[str] = None  # a directory written by `moelab data prepare`
    sampling: str = "random"  # random windows | packed (contiguous, epoch-ordered)

    def validate(self, p: str = "data") -> "DataConfig":
        check_choice(p + ".sampling", self.sampling, ("random", "packed"))
        return self


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> "Config":
        self.model.validate("model")
        self.train.validate("train")
        self.data.validate("data")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len: {self.train.seq_len} is above "
                f"model.max_seq_len={self.model.max_seq_len}"
            )
        return self

    # ---- (de)serialisation ----
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return build(cls, d, "").validate()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        d = self.to_dict()
        text = json.dumps(d, indent=2) if path.suffix == ".json" else yaml.safe_dump(d, sort_keys=False)
        path.write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        d = read_mapping(Path(path))
        # a bare model config (the keys of ModelConfig at the top) is accepted
        if "model" not in d and any(k in d for k in ("d_model", "n_layers", "attention", "ffn")):
            d = {"model": d}
        return cls.from_dict(d)

    def with_overrides(self, sets: list[str]) -> "Config":
        """Apply `--set key=value` overrides (dotted keys, YAML values) and re-validate."""
        d = self.to_dict()
        for item in sets:
            if "=" not in item:
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.batch_size=8")
            key, raw = item.split("=", 1)
            set_dotted(d, key.strip(), yaml.safe_load(raw))
        return Config.from_dict(d)


def check_kinds(model: "ModelConfig") -> None:
    """What each chosen attention and FFN kind needs of the rest of the config (experts to
    route to, matching shared-bank sizes, ...): the layer classes state it in a `check_config`
    classmethod, so a config that validates also builds, and `moelab info` refuses what
    `moelab train` would."""
    from moelab.registry import ATTENTION, FFN

    for registry, kind in ((ATTENTION, model.attention.kind), (FFN, model.ffn.kind)):
        check = getattr(registry.get(kind), "check_config", None)
        if check is not None:
            check(model)


def model_config_from_dict(d: dict) -> ModelConfig:
    return build(ModelConfig, d, "model").validate("model")


# --------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    files = resources.files("moelab.presets").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".yaml"))


def load_preset(name: str) -> Config:
    names = preset_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"preset {name!r} not found{hint}; see `moelab info --list`")
    text = resources.files("moelab.presets").joinpath(name + ".yaml").read_text()
    d = yaml.safe_load(text) or {}
    d.setdefault("name", name)
    try:
        return Config.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"preset {name}: {e}") from None


def resolve_config(preset: str | None = None, config_file: str | None = None,
                   sets: list[str] | None = None) -> Config:
    """The CLI's way to get a config: a preset or a file, then `--set` overrides."""
    if preset and config_file:
        raise ConfigError("give either --preset or --config, not both")
    if config_file:
        cfg = Config.load(config_file)
    elif preset:
        cfg = load_preset(preset)
    else:
        raise ConfigError("no model given: pass --preset NAME or --config FILE")
    return cfg.with_overrides(sets or [])


def model_config_dict(d: dict) -> dict:
    """A stored model config (e.g. from an older moelab) as this version spells it: fields added
    since then take their defaults. ConfigError if it does not parse any more."""
    return dataclasses.asdict(build(ModelConfig, d, "model"))
