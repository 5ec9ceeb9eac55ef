"""Checkpoint tensors of a transformers model -> moelab's names and layouts, streamed to disk.

`tensor_plan` says, for every tensor of the moelab model, which checkpoint tensors make it and
how (`Source`): most are copied; SwiGLU's gate and up projections are concatenated into moelab's
fused `up` ([gate | up], moelab/layers/ffn.py); the E experts of a layer are stacked into the
expert bank's (E, d, h) / (E, h, d) tensors (transposed: nn.Linear stores (out, in)).

The mapping is total in both directions: a moelab tensor without a source, a checkpoint tensor
named by the plan but absent from the files, a checkpoint tensor that nothing maps, and a tensor
of the wrong shape are each an error naming the tensor. The one exception is RoPE's
`rotary_emb.inv_freq` buffers of old checkpoints: they are derived from the config, which moelab
reads instead.

`write_streaming` writes the moelab safetensors file one tensor at a time: the header is known
from the meta-device model, each tensor is read from its shard (`safetensors.safe_open`, which maps
the file), built, written and freed, and a shard's mapping is closed once no tensor still needs it.
Peak memory is about the largest shard that is open plus one built tensor, not the model.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from moelab.config import ModelConfig
from moelab.errors import CheckpointError

DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)  # recomputed from the config; never mapped
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
FROM_ST = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass
class Source:
    keys: tuple[str, ...]
    build: Callable[[list[torch.Tensor]], torch.Tensor] = field(default=lambda ts: ts[0])


def _cat(ts):
    return torch.cat(ts, dim=0)


def _stack_t(ts):  # E nn.Linear weights (out, in) -> (E, in, out)
    return torch.stack([t.t() for t in ts])


def tied_aliases(m: ModelConfig) -> frozenset:
    """Checkpoint tensors that repeat another under tying (some tied checkpoints store the head
    too): the embedding is used."""
    return frozenset({"lm_head.weight"}) if m.tie_embeddings else frozenset()


def tensor_plan(fam, m: ModelConfig, hf_keys: set[str]) -> dict[str, Source]:
    """moelab tensor name -> its source in the checkpoint (see the module docstring)."""
    plan = {"embed.weight": Source(("model.embed_tokens.weight",)),
            "norm.weight": Source(("model.norm.weight",))}
    if not m.tie_embeddings:
        plan["head.weight"] = Source(("lm_head.weight",))
    a = m.attention
    for i in range(m.n_layers):
        hf, mo = f"model.layers.{i}.", f"layers.{i}."
        plan[mo + "attn_norm.weight"] = Source((hf + "input_layernorm.weight",))
        plan[mo + "ffn_norm.weight"] = Source((hf + "post_attention_layernorm.weight",))
        for p in ("q", "k", "v", "o"):
            plan[f"{mo}attn.{p}_proj.weight"] = Source((f"{hf}self_attn.{p}_proj.weight",))
            if a.bias or (a.qkv_bias and p != "o"):
                plan[f"{mo}attn.{p}_proj.bias"] = Source((f"{hf}self_attn.{p}_proj.bias",))
        if a.qk_norm:
            inner = ".norm" if a.qk_norm_scope == "all" else ""
            for p in ("q", "k"):
                plan[f"{mo}attn.{p}_norm{inner}.weight"] = Source((f"{hf}self_attn.{p}_norm.weight",))
        if m.ffn.kind == "dense":
            _mlp(plan, mo + "ffn.", hf + "mlp.", m.ffn.bias)
        else:
            _moe(plan, fam, m, mo + "ffn.", hf, hf_keys)
    return plan


def _mlp(plan, mo: str, hf: str, bias: bool) -> None:
    """A SwiGLU MLP (gate_proj, up_proj, down_proj) -> moelab's DenseFFN (up = [gate | up])."""
    plan[mo + "up.weight"] = Source((hf + "gate_proj.weight", hf + "up_proj.weight"), _cat)
    plan[mo + "down.weight"] = Source((hf + "down_proj.weight",))
    if bias:
        plan[mo + "up.bias"] = Source((hf + "gate_proj.bias", hf + "up_proj.bias"), _cat)
        plan[mo + "down.bias"] = Source((hf + "down_proj.bias",))


def _moe(plan, fam, m: ModelConfig, mo: str, hf: str, hf_keys: set[str]) -> None:
    E = m.ffn.n_experts
    block = hf + "mlp."
    if fam.moe == "mixtral" and hf + "mlp.gate.weight" not in hf_keys:
        block = hf + "block_sparse_moe."  # its checkpoints' name (transformers 5: mlp)
    plan[mo + "router.weight"] = Source((block + "gate.weight",))
    ex = block + "experts."
    if ex + "gate_up_proj" in hf_keys:  # transformers 5's fused layout: (E, 2h, d), (E, d, h)
        h = m.ffn.expert_dim
        plan[mo + "experts.w1_EDH"] = Source((ex + "gate_up_proj",),
                                             lambda ts: ts[0][:, :h].transpose(1, 2))
        plan[mo + "experts.w3_EDH"] = Source((ex + "gate_up_proj",),
                                             lambda ts: ts[0][:, h:].transpose(1, 2))
        plan[mo + "experts.w2_EHD"] = Source((ex + "down_proj",), lambda ts: ts[0].transpose(1, 2))
    else:  # one nn.Linear per expert (what save_pretrained and released checkpoints hold)
        gate, up, down = ("w1", "w3", "w2") if block.endswith("block_sparse_moe.") else (
            "gate_proj", "up_proj", "down_proj")
        for mine, theirs in (("w1_EDH", gate), ("w3_EDH", up), ("w2_EHD", down)):
            plan[mo + "experts." + mine] = Source(
                tuple(f"{ex}{e}.{theirs}.weight" for e in range(E)), _stack_t)
    if m.ffn.n_shared_experts:
        _mlp(plan, mo + "shared.", block + "shared_expert.", False)
    if m.ffn.shared_gate:
        plan[mo + "shared_gate.weight"] = Source((block + "shared_expert_gate.weight",))


# ---------------------------------------------------------------------------------------------
# reading shards
# ---------------------------------------------------------------------------------------------
class Shards:
    """The checkpoint's safetensors files: key -> file, opened lazily with `safe_open`."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        self.dir, self._open = hf_dir, safe_open
        index = hf_dir / "model.safetensors.index.json"
        single = hf_dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (hf_dir / f).is_file():
                    raise CheckpointError(f"{hf_dir / f}: shard named in {index.name} is missing")
            self.files = files
            self.key_file = dict(weight_map)
            for f in files:  # the index must tell the truth about each shard
                with safe_open(str(hf_dir / f), "pt") as h:
                    keys = set(h.keys())
                claimed = {k for k, v in weight_map.items() if v == f}
                if claimed - keys:
                    k = sorted(claimed - keys)[0]
                    raise CheckpointError(f"{hf_dir / f}: tensor {k!r} named in {index.name} "
                                          "is not in this shard")
                for k in keys - claimed:
                    self.key_file[k] = f  # unmapped ones are reported by the plan check
        elif single.is_file():
            self.files = [single.name]
            with safe_open(str(single), "pt") as h:
                self.key_file = {k: single.name for k in h.keys()}
        else:
            other = sorted(p.name for p in hf_dir.glob("*.bin")) + sorted(
                p.name for p in hf_dir.glob("*.pt"))
            hint = (f" ({other[0]} would need unpickling, which moelab never does; convert it "
                    "to safetensors first)" if other else "")
            raise CheckpointError(f"{hf_dir}: no model.safetensors or "
                                  f"model.safetensors.index.json{hint}")
        self.handles: dict[str, object] = {}

    def keys(self) -> set[str]:
        return set(self.key_file)

    def _handle(self, key: str):
        f = self.key_file[key]
        if f not in self.handles:
            self.handles[f] = self._open(str(self.dir / f), "pt")
        return self.handles[f]

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        s = self._handle(key).get_slice(key)
        return tuple(s.get_shape()), s.get_dtype()

    def get(self, key: str) -> torch.Tensor:
        return self._handle(key).get_tensor(key)

    def release(self, files: set[str]) -> None:
        """Close the mappings of shards no remaining tensor needs."""
        for f in files:
            self.handles.pop(f, None)


def check_plan(plan: dict[str, Source], want: dict[str, torch.Size], shards: Shards,
               where: str, aliases: frozenset = frozenset()) -> None:
    """Every moelab tensor has a source, every named source exists, every checkpoint tensor is
    used (or derived, or in `aliases`: a tied head stored again), and each source tensor's
    shape is right."""
    missing = sorted(set(want) - set(plan))
    if missing:
        raise CheckpointError(f"{where}: moelab tensor {missing[0]!r} has no source in the "
                              "mapping (an importer bug; please report it)")
    have = shards.keys()
    used = {k for s in plan.values() for k in s.keys}
    absent = sorted(used - have)
    if absent:
        raise CheckpointError(f"{where}: tensor {absent[0]!r} is missing from the checkpoint "
                              f"(expected by the config; {len(absent)} missing in all)")
    unmapped = sorted(k for k in have - used - aliases if not k.endswith(DERIVED_SUFFIXES))
    if unmapped:
        raise CheckpointError(f"{where}: tensor {unmapped[0]!r} is not mapped to moelab "
                              f"({len(unmapped)} unmapped in all); the config does not "
                              "describe this checkpoint")
    for name, src in plan.items():
        shapes = [shards.shape_dtype(k)[0] for k in src.keys]
        got = src.build([torch.empty(s, device="meta") for s in shapes]).shape
        if tuple(got) != tuple(want[name]):
            detail = ", ".join(f"{k} {list(s)}" for k, s in zip(src.keys[:3], shapes[:3]))
            raise CheckpointError(f"{where}: tensor shape mismatch: {detail} give "
                                  f"{list(got)} but moelab's {name} is {list(want[name])}")


def write_streaming(path: Path, plan: dict[str, Source], want: dict[str, torch.Size],
                    shards: Shards, dtype: torch.dtype | None = None,
                    metadata: dict[str, str] | None = None) -> int:
    """Write the moelab tensors of `plan` to a safetensors file at `path`, one at a time, in
    the order of the shards they come from; returns the bytes of tensor data written.
    `dtype` None keeps each tensor's checkpoint dtype (float32, bfloat16 or float16)."""
    first_file = {n: shards.files.index(shards.key_file[s.keys[0]]) for n, s in plan.items()}
    order = sorted(plan, key=lambda n: (first_file[n], n))
    dtypes, offsets, pos = {}, {}, 0
    for n in order:
        st = shards.shape_dtype(plan[n].keys[0])[1]
        dt = dtype or FROM_ST.get(st)
        if dt is None:
            raise CheckpointError(f"{shards.dir}: tensor {plan[n].keys[0]!r} has dtype {st}; "
                                  "moelab imports float32, bfloat16 and float16 weights")
        size = dt.itemsize
        for s in want[n]:
            size *= s
        dtypes[n], offsets[n] = dt, (pos, pos + size)
        pos += size
    header = {n: {"dtype": ST_DTYPES[dtypes[n]], "shape": list(want[n]),
                  "data_offsets": list(offsets[n])} for n in order}
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    last_use: dict[str, int] = {}
    for i, n in enumerate(order):
        for k in plan[n].keys:
            last_use[shards.key_file[k]] = i
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, n in enumerate(order):
            t = plan[n].build([shards.get(k) for k in plan[n].keys])
            t = t.to(dtypes[n]).contiguous()
            f.write(t.view(torch.uint8).reshape(-1).numpy().data)
            del t
            shards.release({fn for fn, last in last_use.items() if last == i})
    return pos
