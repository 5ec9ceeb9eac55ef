"""Match forward MACs per token to a reference model by moving one free size knob.

Each architecture has knobs that change its compute without changing what it is: the dense FFN
width, experts per token, expert width, attention expert width. `match_macs` tries the knobs
that apply to a config in order, searches each over integers, and keeps the first setting whose
MACs per token are within the tolerance of the reference (or the closest one found).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moelab.config import Config, ModelConfig
from moelab.errors import ConfigError, MoelabError
from moelab.flops import count

# knob -> (applies to this config?, lower bound, upper bound, step)
KNOBS = {
    "ffn.top_k": (lambda m: m.ffn.kind in ("moe", "sigma_moe") or m.ffn.kind.startswith("umoe"),
                  lambda m: 1, lambda m: m.ffn.n_experts, 1),
    "ffn.expert_dim": (lambda m: m.ffn.kind not in ("dense", "mole"), lambda m: 8,
                       lambda m: 16 * m.ffn.expert_dim, 8),
    "ffn.d_ff": (lambda m: m.ffn.kind in ("dense", "mole"), lambda m: 8, lambda m: 16 * m.ffn.d_ff, 8),
    "attention.top_k": (lambda m: m.attention.n_experts > 0, lambda m: 1,
                        lambda m: m.attention.n_experts, 1),
    "attention.expert_dim": (lambda m: m.attention.n_experts > 0, lambda m: 8,
                             lambda m: 16 * (m.attention.expert_dim or m.head_dim), 8),
}


@dataclass
class MatchResult:
    config: Config
    knob: str | None
    old: object
    new: object
    macs: float
    ref_macs: float

    @property
    def rel_error(self) -> float:
        return self.macs / self.ref_macs - 1

    def describe(self) -> str:
        if self.knob is None:
            return f"{self.config.name}: unchanged ({100 * self.rel_error:+.1f}% MACs vs reference)"
        return (f"{self.config.name}: model.{self.knob} {self.old} -> {self.new} "
                f"({100 * self.rel_error:+.1f}% MACs vs reference)")


def macs_per_token(m: ModelConfig, seq_len: int) -> float:
    """Forward MACs per token of the model as it is deployed. For MoLE that is the lookup form
    (MoLE sec. 3.3): its routed experts become per-token tables after training, so only the
    shared FFN, the router and the mixing of looked-up rows cost compute, and its knob is the
    shared FFN width."""
    if m.ffn.kind == "mole":
        m = dataclasses.replace(m, ffn=dataclasses.replace(m.ffn, kind="mole_lookup"))
    return count(m, seq_len=seq_len)["macs_per_token"]


def _get(m: ModelConfig, knob: str):
    part, name = knob.split(".")
    return getattr(getattr(m, part), name)


def _with(m: ModelConfig, knob: str, value) -> ModelConfig | None:
    part, name = knob.split(".")
    new = dataclasses.replace(m, **{part: dataclasses.replace(getattr(m, part), **{name: value})})
    try:
        return new.validate()
    except MoelabError:
        return None


def match_macs(cfg: Config, ref_macs: float, tolerance: float = 0.05) -> MatchResult:
    """Adjust `cfg` so its forward MACs per token (at train.seq_len) are within `tolerance` of
    `ref_macs`; returns the new config and what changed."""
    T = cfg.train.seq_len
    m = cfg.model
    base = macs_per_token(m, T)
    best = MatchResult(cfg, None, None, None, base, ref_macs)
    if abs(base / ref_macs - 1) <= tolerance:
        return best
    for knob, (applies, lo_fn, hi_fn, step) in KNOBS.items():
        if not applies(m) or _get(m, knob) is None:
            continue
        lo, hi = lo_fn(m), hi_fn(m)
        # MACs grow monotonically with every knob: bisect for the value closest to ref_macs
        while hi - lo > step:
            mid = (lo + hi) // 2 // step * step or step
            cand = _with(m, knob, mid)
            if cand is None:
                break
            if macs_per_token(cand, T) < ref_macs:
                lo = mid
            else:
                hi = mid
        for value in {lo, hi}:
            cand = _with(m, knob, value)
            if cand is None:
                continue
            macs = macs_per_token(cand, T)
            if abs(macs / ref_macs - 1) < abs(best.rel_error):
                d = cfg.to_dict()
                d["model"] = dataclasses.asdict(cand)
                best = MatchResult(Config.from_dict(d), knob, _get(m, knob), value, macs, ref_macs)
        if abs(best.rel_error) <= tolerance:
            return best
    if abs(best.rel_error) > tolerance:
        raise ConfigError(f"--match-macs: could not bring {cfg.name} within "
                          f"{100 * tolerance:.0f}% of the reference "
                          f"(best {100 * best.rel_error:+.1f}% via {best.knob})")
    return best
