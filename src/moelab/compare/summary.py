"""Seed statistics and the papers' orderings, computed from a study's rows.

`results.md` states, for every ordering the four papers report that the study's members can test,
the two models' validation perplexities (mean over seeds, with the range), the gap, and a verdict
that accounts for the seed spread. Nothing here is typed in by hand: every figure comes from the
members' `compare.json` rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import mean

# A study member is known by its preset's architecture name: the preset name without its size
# suffix ("umoe-att-tiny" -> "umoe-att"), so the same orderings apply to any size family whose
# presets are named alike.
SIZE_SUFFIXES = ("-tiny",)
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")  # a member given as a config file, not a preset

# A MoLE model counts as "close to" MoE when its perplexity is within this fraction of MoE's.
CLOSE_REL = 0.02


@dataclass(frozen=True)
class Ordering:
    """A claim `a REL b` on validation perplexity, from one of the papers."""
    a: str
    rel: str  # "<" (a better), "<=" (a better or equal), "~" (a within CLOSE_REL of b)
    b: str
    source: str


ORDERINGS = (
    Ordering("umoe", "<", "umoe-att", "UMoE (MAC-matched): sharing the expert bank with the FFN helps"),
    Ordering("umoe-att", "<=", "moe", "UMoE (MAC-matched): attention experts vs FFN experts"),
    Ordering("umoe", "<", "moe", "UMoE (MAC-matched): UMoE beats FFN-MoE"),
    Ordering("umoe", "<", "dense", "UMoE (MAC-matched): UMoE beats dense"),
    Ordering("umoe-att", "<", "moa", "UMoE Table 1 (parameter-matched): pre-mixing attention "
             "experts beat MoA"),
    Ordering("umoe-att", "<", "switchhead", "UMoE Table 1 (parameter-matched): pre-mixing "
             "attention experts beat SwitchHead"),
    Ordering("moe", "<", "dense", "UMoE / MoLE: FFN-MoE beats dense at equal active compute"),
    Ordering("gated", "<", "dense", "Gated attention: the output gate lowers perplexity"),
    Ordering("moeut", "<=", "dense", "MoEUT: matches or beats dense with fewer MACs"),
    Ordering("mole", "~", "moe", "MoLE: close to MoE at equal active parameters"),
)


def architecture(preset: str) -> str:
    """The preset's architecture (its name without the size suffix); a config-file member is
    named by its file stem."""
    if preset.endswith(CONFIG_SUFFIXES):
        preset = Path(preset).stem
    for suffix in SIZE_SUFFIXES:
        if preset.endswith(suffix):
            return preset[: -len(suffix)]
    return preset


def by_architecture(rows: list[dict]) -> dict[str, list[float]]:
    """Validation perplexity of every finished seed, per architecture."""
    out: dict[str, list[float]] = {}
    for r in rows:
        out.setdefault(architecture(r["preset"]), []).append(float(r["val_ppl"]))
    return out


def seed_table(rows: list[dict]) -> list[str]:
    """Markdown lines: per preset, the number of seeds and the mean and range of val perplexity.
    Empty when no preset has more than one seed."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["preset"], []).append(r)
    if all(len(g) < 2 for g in groups.values()):
        return []
    lines = ["| preset | seeds | val ppl mean | min | max | max - min |", "|---|---|---|---|---|---|"]
    for preset, g in sorted(groups.items(), key=lambda kv: mean(float(r["val_ppl"]) for r in kv[1])):
        ppl = [float(r["val_ppl"]) for r in g]
        seeds = ",".join(str(r["seed"]) for r in sorted(g, key=lambda r: r["seed"]))
        lines.append(f"| {preset} | {seeds} | {mean(ppl):.2f} | {min(ppl):.2f} | {max(ppl):.2f} | "
                     f"{max(ppl) - min(ppl):.2f} |")
    return lines


def verdict(o: Ordering, a: list[float], b: list[float]) -> str:
    """Whether `o` holds for these per-seed perplexities, and how firmly.

    With one seed on either side there is no spread to judge against, which the verdict says.
    With several, "<" holds clearly only when every seed of a is below every seed of b; when the
    ranges overlap the means decide, and the verdict says the gap is within the seed spread.
    """
    ma, mb = mean(a), mean(b)
    gap = ma / mb - 1
    spread = " (1 seed)" if min(len(a), len(b)) < 2 else ""
    if o.rel == "~":
        ok = abs(gap) <= CLOSE_REL
        return (f"holds{spread}: within {CLOSE_REL:.0%}" if ok
                else f"does not hold{spread}: {abs(gap):.1%} apart")
    separated = max(a) < min(b) or min(a) > max(b)
    better = ma < mb
    if spread:
        ok = better or (o.rel == "<=" and ma == mb)
        return f"holds{spread}" if ok else f"reversed{spread}"
    if separated:
        return "holds, beyond the seed spread" if better else "reversed, beyond the seed spread"
    if o.rel == "<=":
        return "holds: equal within the seed spread"
    return ("holds on the means, within the seed spread" if better
            else "reversed on the means, within the seed spread")


def ordering_table(rows: list[dict]) -> list[str]:
    """Markdown lines: every ordering whose two architectures both have finished members."""
    ppl = by_architecture(rows)
    lines = []
    for o in ORDERINGS:
        if o.a not in ppl or o.b not in ppl:
            continue
        a, b = ppl[o.a], ppl[o.b]
        lines.append(f"| {o.a} {o.rel} {o.b} | {_cell(a)} | {_cell(b)} | {mean(a) / mean(b) - 1:+.1%} "
                     f"| {verdict(o, a, b)} | {o.source} |")
    if not lines:
        return []
    return ["| ordering | val ppl (a) | val ppl (b) | a vs b | verdict | claim |",
            "|---|---|---|---|---|---|", *lines]


def missing_orderings(rows: list[dict]) -> list[str]:
    ppl = by_architecture(rows)
    return [f"{o.a} {o.rel} {o.b}" for o in ORDERINGS if o.a not in ppl or o.b not in ppl]


def _cell(ppl: list[float]) -> str:
    if len(ppl) == 1:
        return f"{ppl[0]:.2f}"
    return f"{mean(ppl):.2f} ({min(ppl):.2f}-{max(ppl):.2f}, {len(ppl)} seeds)"
