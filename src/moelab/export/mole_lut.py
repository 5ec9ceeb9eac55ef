"""Re-parameterise a trained MoLE into lookup tables (MoLE sec. 3.3) and store them.

    v_j^i = FFN_j(RMSNorm_l(Embedding(i)))   for every token i, expert j, distinct layer l

The converted directory is self-contained:

    OUT/mole_lut.json     header: shapes, codec and its block size, record layout, sha256 of
                          every file, the source checkpoint
    OUT/lut.bin           the tables, raw bytes, layout [vocab][layer][record] (memory-mappable):
                          all layers' rows of one token are contiguous, as the paper's
                          (V, L*N*d) table; one record = one token's (N, d) rows of one layer,
                          encoded by the codec, padded to a multiple of 16 bytes
    OUT/model.safetensors every non-expert weight (embedding, attention, router, shared expert,
                          norms, head) as the `mole_lookup` model expects them
    OUT/config.json       the run's Config (ffn.kind stays `mole`; the header marks the form)
    OUT/tokenizer.json, OUT/run.json   copied from the run when it has them

Codecs (one small class each, registered by name): fp32, fp16, bf16 (a cast); int8 (per-row
absmax: one float32 scale per (token, expert) row of d values); nf4 (the 16-level NormalFloat
code book of QLoRA, block-wise absmax, float32 scale per block; the default block is one
(token, expert) row, the paper's "token-wise" blocks, which gives (4 + 32/d)/16 of fp16 storage:
25.3% at d = 768, the paper's Table 8).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from moelab.errors import CheckpointError, ConfigError
from moelab.fsutil import atomic_directory

HEADER = "mole_lut.json"
TABLE = "lut.bin"
FORMAT = "moelab-mole-lut"
VERSION = 1
ALIGN = 16  # record size multiple: float32 views of any record slice stay aligned

CODECS: dict[str, type["Codec"]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        CODECS[name] = cls
        return cls
    return deco


class Codec:
    """Turns one layer's rows of U tokens, (U, N, d) float32, into (U, record_bytes) uint8 and
    back. Scales (if any) are stored first in a record so that their float32 view is aligned."""

    name = "?"

    def __init__(self, n_experts: int, d_model: int, block_size: int | None = None):
        self.N, self.d = n_experts, d_model

    @property
    def payload_bytes(self) -> int:
        raise NotImplementedError

    @property
    def record_bytes(self) -> int:
        return -(-self.payload_bytes // ALIGN) * ALIGN

    def header(self) -> dict:
        return {"name": self.name}

    def encode(self, v_UND: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, rec_UR: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def _pad(self, payload_UP: torch.Tensor) -> torch.Tensor:
        out = payload_UP.new_zeros(payload_UP.shape[0], self.record_bytes)
        out[:, : payload_UP.shape[1]] = payload_UP
        return out


class _FloatCodec(Codec):
    dtype = torch.float32

    @property
    def payload_bytes(self) -> int:
        return self.N * self.d * self.dtype.itemsize

    def encode(self, v_UND):
        return self._pad(v_UND.to(self.dtype).reshape(v_UND.shape[0], -1).view(torch.uint8))

    def decode(self, rec_UR, dtype):
        U = rec_UR.shape[0]
        return rec_UR[:, : self.payload_bytes].view(self.dtype).view(U, self.N, self.d).to(dtype)


@register("fp32")
class Fp32Codec(_FloatCodec):
    dtype = torch.float32


@register("fp16")
class Fp16Codec(_FloatCodec):
    dtype = torch.float16


@register("bf16")
class Bf16Codec(_FloatCodec):
    dtype = torch.bfloat16


@register("int8")
class Int8Codec(Codec):
    """q = round(v / s), s = max|row| / 127 per (token, expert) row: |v - q s| <= s / 2."""

    @property
    def payload_bytes(self) -> int:
        return self.N * 4 + self.N * self.d

    def encode(self, v_UND):
        U = v_UND.shape[0]
        v = v_UND.float()
        s_UN = v.abs().amax(-1) / 127.0
        s_UN = torch.where(s_UN > 0, s_UN, torch.ones_like(s_UN))  # an all-zero row stays zero
        q_UND = torch.round(v / s_UN[..., None]).clamp_(-127, 127).to(torch.int8)
        return self._pad(torch.cat([s_UN.view(torch.uint8).view(U, -1),
                                    q_UND.view(torch.uint8).view(U, -1)], 1))

    def decode(self, rec_UR, dtype):
        U, N, d = rec_UR.shape[0], self.N, self.d
        s_UN = rec_UR[:, : N * 4].view(torch.float32)
        q_UND = rec_UR[:, N * 4: N * 4 + N * d].view(torch.int8).view(U, N, d)
        return (q_UND.to(torch.float32) * s_UN[..., None]).to(dtype)


def nf4_code_book() -> torch.Tensor:
    """The 16 NF4 levels (Dettmers et al., QLoRA, sec. 3): quantiles of N(0, 1), 8 on the
    positive side and 7 on the negative side plus an exact zero, scaled into [-1, 1]. The
    outermost quantile is taken at p = 1 - (1/32 + 1/30) / 2 ~ 0.9677 (between the last
    quantile centres of 16 and 15 equal bins, as QLoRA does) so that the +-1 levels are finite."""
    p_hi = 1 - (1 / 32 + 1 / 30) / 2
    pos = torch.special.ndtri(torch.linspace(p_hi, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(p_hi, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).float()


@register("nf4")
class NF4Codec(Codec):
    """Block-wise NF4: each block of `block_size` values along a (token, expert) row is scaled by
    its absmax and every value replaced by the nearest of the 16 NF4 levels (4 bits, two per
    byte). |v - deq| <= absmax * (largest half-gap of the code book) = 0.152 absmax."""

    def __init__(self, n_experts: int, d_model: int, block_size: int | None = None):
        super().__init__(n_experts, d_model)
        self.block = block_size or d_model
        if d_model % self.block or self.block % 2:
            raise ConfigError(f"nf4 block size {self.block} must be even and divide d_model="
                              f"{d_model}")
        self.n_blocks = n_experts * d_model // self.block
        self.levels = nf4_code_book()
        self.mid = (self.levels[1:] + self.levels[:-1]) / 2  # decision boundaries

    @property
    def payload_bytes(self) -> int:
        return self.n_blocks * 4 + self.N * self.d // 2

    def header(self) -> dict:
        return {"name": self.name, "block_size": self.block}

    def encode(self, v_UND):
        U = v_UND.shape[0]
        v_UKB = v_UND.float().reshape(U, self.n_blocks, self.block)
        s_UK = v_UKB.abs().amax(-1)
        s_UK = torch.where(s_UK > 0, s_UK, torch.ones_like(s_UK))
        code = torch.bucketize(v_UKB / s_UK[..., None], self.mid.to(v_UKB.device))
        code = code.to(torch.uint8).view(U, -1)
        packed = code[:, 0::2] | (code[:, 1::2] << 4)  # element 2i in the low nibble
        return self._pad(torch.cat([s_UK.view(torch.uint8).view(U, -1), packed], 1))

    def decode(self, rec_UR, dtype):
        U, K = rec_UR.shape[0], self.n_blocks
        s_UK = rec_UR[:, : K * 4].view(torch.float32)
        packed = rec_UR[:, K * 4: K * 4 + self.N * self.d // 2]
        code = torch.stack([packed & 0xF, packed >> 4], -1).view(U, K, self.block).long()
        v_UKB = self.levels.to(rec_UR.device)[code] * s_UK[..., None]
        return v_UKB.view(U, self.N, self.d).to(dtype)


def make_codec(name: str, n_experts: int, d_model: int, block_size: int | None = None) -> Codec:
    if name not in CODECS:
        raise ConfigError(f"--dtype {name!r}: not a lookup-table dtype; allowed: "
                          f"{', '.join(CODECS)}")
    return CODECS[name](n_experts, d_model, block_size)


def codec_from_header(h: dict) -> Codec:
    c = h["codec"]
    return make_codec(c["name"], h["n_experts"], h["d_model"], c.get("block_size"))


# ---------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------
def convert_mole_lut(run_dir: str | Path, out_dir: str | Path, dtype: str = "fp16",
                     block_size: int | None = None, chunk_tokens: int = 4096,
                     overwrite: bool = False) -> dict:
    """Convert the newest checkpoint of a MoLE run (or a checkpoint directory) into a
    self-contained lookup directory; returns its header. `moelab convert mole-lut`."""
    from moelab.train.checkpoint import find_tokenizer, load_weights, resolve_checkpoint
    from moelab.model import MoELM

    _check_out(out_dir, overwrite)
    _check_dtype(dtype, block_size)
    if (Path(run_dir) / HEADER).is_file():
        raise ConfigError(f"{run_dir} is already a converted MoLE directory; convert the "
                          "training run it came from (its mole_lut.json names the checkpoint)")
    from moelab.loading import model_dir_kind, open_model, read_model_config

    path = Path(run_dir).expanduser()
    cfg = read_model_config(path)  # any model directory (moelab.loading)
    if cfg.model.ffn.kind != "mole":  # before building the model: the weights may be large
        raise ConfigError(f"{run_dir}: model.ffn.kind is {cfg.model.ffn.kind!r}; only a MoLE "
                          "run (ffn.kind: mole) can be re-parameterised into lookup tables")
    if model_dir_kind(path) in ("run", "checkpoint"):
        ckpt = resolve_checkpoint(path)
        model = MoELM(cfg.model)
        load_weights(model, ckpt)
        run = ckpt.parent.parent
    else:  # an exported MoLE (moelab export hf)
        opened = open_model(path)
        model, ckpt, run = opened.model, opened.checkpoint, path
    # the run's tokenizer and data record travel along, so that `moelab generate/eval DIR`
    # find the tokenizer and the data directory without the run directory
    extra = [p for p in (find_tokenizer(ckpt), run / "run.json")
             if p is not None and Path(p).is_file()]
    return convert_model(model, cfg, out_dir, dtype, block_size, chunk_tokens, overwrite,
                         extra_files=extra, source={"checkpoint": str(Path(ckpt).resolve())})


def convert_model(model, cfg, out_dir: str | Path, dtype: str = "fp16",
                  block_size: int | None = None, chunk_tokens: int = 4096,
                  overwrite: bool = False, extra_files=(), source: dict | None = None) -> dict:
    """Tables of every distinct layer of a `MoELM` with `ffn.kind: mole`, plus its other
    weights, written atomically to `out_dir` (temporary directory + rename)."""
    m = cfg.model
    if m.ffn.kind != "mole":
        raise ConfigError(f"model.ffn.kind is {m.ffn.kind!r}: only a `mole` model can be "
                          "re-parameterised into lookup tables")
    out = _check_out(out_dir, overwrite)
    _check_dtype(dtype, block_size)
    codec = make_codec(dtype, m.ffn.n_experts, m.d_model, block_size)
    V, L, R = m.vocab_size, m.n_distinct_layers, codec.record_bytes
    with atomic_directory(out) as tmp:
        table = np.memmap(tmp / TABLE, dtype=np.uint8, mode="w+", shape=(V, L, R))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            emb_VD = model.embed.weight
            for layer, block in enumerate(model.layers):
                for v0 in range(0, V, chunk_tokens):
                    v_UND = block.ffn.expert_outputs(emb_VD[v0:v0 + chunk_tokens])
                    table[v0:v0 + v_UND.shape[0], layer] = codec.encode(v_UND).numpy()
        model.train(was_training)
        table.flush()
        del table
        _save_non_expert_weights(model, cfg, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        for f in extra_files:
            shutil.copyfile(f, tmp / Path(f).name)
        header = {
            "format": FORMAT, "version": VERSION, "file": TABLE,
            "layout": "[vocab][layer][record]", "shape": [V, L, R],
            "vocab_size": V, "n_layers": L, "schedule": [i % L for i in range(m.n_layers)],
            "n_experts": m.ffn.n_experts, "d_model": m.d_model,
            "dtype": dtype, "codec": codec.header(), "record_bytes": R,
            "payload_bytes": codec.payload_bytes,
            "bytes_per_token": L * R,  # all layers' rows of one token
            "storage_vs_fp16": codec.payload_bytes / (m.ffn.n_experts * m.d_model * 2),
            "source": source or {},
            "sha256": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())},
        }
        (tmp / HEADER).write_text(json.dumps(header, indent=2))
    return header


def _check_out(out_dir, overwrite: bool) -> Path:
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose a new --out or pass --overwrite "
                              "(overwrite=True)")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / HEADER).is_file():
        # --overwrite replaces an earlier conversion, never some other directory's contents
        raise CheckpointError(f"{out} is not empty and not a converted MoLE directory (no "
                              f"{HEADER}); refusing to replace it, choose another --out")
    return out


def _check_dtype(dtype: str, block_size: int | None) -> None:
    if dtype not in CODECS:
        raise ConfigError(f"--dtype {dtype!r}: not a lookup-table dtype; allowed: "
                          f"{', '.join(CODECS)}")
    if block_size is not None and dtype != "nf4":
        raise ConfigError(f"--block-size {block_size}: only the nf4 dtype has blocks, not "
                          f"{dtype!r}")
    if block_size is not None and block_size <= 0:
        raise ConfigError(f"--block-size {block_size}: expected a positive even number")


def _save_non_expert_weights(model, cfg, path: Path) -> None:
    from safetensors.torch import save_model

    from moelab.export.mole_model import lookup_config
    from moelab.model import MoELM

    lookup = MoELM(lookup_config(cfg).model)
    sd = {k: v for k, v in model.state_dict().items() if not _is_expert_key(k)}
    lookup.load_state_dict(sd, strict=True)
    save_model(lookup, str(path))


def _is_expert_key(name: str) -> bool:
    return ".ffn.experts." in name or ".ffn.expert_norm." in name


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_header(path: str | Path) -> dict:
    p = Path(path) / HEADER
    try:
        h = json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a converted MoLE directory ({HEADER} is missing)") \
            from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    if h.get("format") != FORMAT or h.get("version") != VERSION:
        raise CheckpointError(f"{p}: format {h.get('format')!r} v{h.get('version')} is not "
                              f"{FORMAT} v{VERSION}")
    return h


def verify(path: str | Path) -> None:
    """Recompute every file's sha256 against the header (reads the whole table)."""
    h = read_header(path)
    for name, digest in h["sha256"].items():
        f = Path(path) / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the converted directory")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f}: sha256 does not match {HEADER}; the file is corrupt")
