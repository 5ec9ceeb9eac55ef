"""The inference form of a converted MoLE: `MoLELookupLM` and where its tables live.

`MoLELookupLM` is `MoELM` built with `ffn.kind: mole_lookup` (router + shared expert per layer,
no expert weights): same forward / new_cache / generate. Around each forward it opens a fetch
over `LookupTables`, which gathers the rows of the tokens in `idx_BT` once per forward (each
distinct token once, all layers), in layer order:

- storage `ram`:    the table is read into CPU memory; rows are gathered up front (a memcpy).
- storage `mmap`:   the table stays on disk, mapped with `MADV_RANDOM` (rows are scattered: the
                    kernel's read-around would pull megabytes per 4 KiB row). When a forward
                    starts, every token's row (all layers, contiguous) is announced with
                    POSIX_FADV_WILLNEED: the kernel reads them while the embedding and the first
                    attention compute, and each layer then gathers its rows from the page cache.
- storage `pinned`: (CUDA) the table in page-locked host memory; each layer's rows are copied
                    with non-blocking copies on a side stream, layer l+1's copy overlapping layer
                    l's compute; the main stream waits on that layer's event only.
- storage `device`: the table on the accelerator itself.
Rows travel in their stored (possibly quantised) form and are dequantised where they are used.

`load_converted(dir)` builds it; any model directory (a run, a converted directory, a
transformers directory) opens with `moelab.loading.open_model`. A fetch is per-forward state held by the tables object: one forward at a
time per model (not re-entrant across threads).
"""
from __future__ import annotations

import json
import mmap
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from moelab.config import Config, ModelConfig
from moelab.errors import CheckpointError, ConfigError
from moelab.export.mole_lut import HEADER, codec_from_header, read_header, verify
from moelab.model import MoELM

STORAGES = ("auto", "ram", "mmap", "pinned", "device")
RAM_AUTO_MAX_BYTES = 1 << 30  # `auto` on CPU: tables up to 1 GiB are read into RAM
DEDUP_MIN_TOKENS = 64  # above this many tokens a forward reads each distinct token once


def is_converted_dir(path: str | Path) -> bool:
    return (Path(path) / HEADER).is_file()


def lookup_config(cfg: Config) -> Config:
    """The run's config with the training-form FFN replaced by its lookup form."""
    d = cfg.to_dict()
    d["model"]["ffn"]["kind"] = "mole_lookup"
    return Config.from_dict(d)


class LookupTables:
    """A converted directory's tables (V, L, record bytes) in one of the storages above."""

    def __init__(self, path: str | Path, header: dict, storage: str = "ram",
                 device: str | torch.device = "cpu"):
        self.header, self.codec = header, codec_from_header(header)
        self.device = torch.device(device)
        V, L, R = header["shape"]
        self.shape = (V, L, R)
        self.file = Path(path) / header["file"]
        size = self.file.stat().st_size if self.file.is_file() else -1
        if size != V * L * R:
            raise CheckpointError(f"{self.file}: {size} bytes, the header says {V}x{L}x{R} = "
                                  f"{V * L * R}; the table is missing or truncated")
        self.storage = _resolve_storage(storage, self.device, size)
        if self.storage in ("pinned", "device") and self.device.type != "cuda":
            raise ConfigError(f"lookup storage {self.storage!r} needs a CUDA device")
        self.bytes_read = 0  # bytes gathered from the table so far (benchmarks read this)
        self._fd: Optional[int] = None
        self._mm: Optional[mmap.mmap] = None
        self._pool: Optional[ThreadPoolExecutor] = None
        if self.storage == "mmap":
            self._fd = os.open(self.file, os.O_RDONLY)
            self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            if hasattr(mmap, "MADV_RANDOM"):
                self._mm.madvise(mmap.MADV_RANDOM)
            arr = np.frombuffer(self._mm, dtype=np.uint8).reshape(V, L, R)
            if self.device.type == "cuda":  # overlaps each layer's gather and copy (_Fetch)
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="moelab-lut")
        else:
            arr = np.fromfile(self.file, dtype=np.uint8).reshape(V, L, R)
        with warnings.catch_warnings():  # read-only mapping: torch warns, nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            table = torch.from_numpy(arr)
        if self.storage == "pinned":
            table = table.pin_memory()
        elif self.storage == "device":
            table = table.to(self.device)
        self.table_VLR = table
        self._stream = (torch.cuda.Stream(self.device) if self.device.type == "cuda"
                        and self.storage != "device" else None)
        self._staging: dict[int, tuple] = {}  # CUDA: layer -> (pinned buffer, its last copy)
        self._fetch: Optional[_Fetch] = None

    @property
    def resident_bytes(self) -> int:
        """Bytes of table held in process memory (0 for mmap: the page cache is the kernel's)."""
        return 0 if self.storage == "mmap" else self.table_VLR.numel()

    @contextmanager
    def fetch(self, idx_BT: torch.Tensor):
        """Start reading the rows of `idx_BT`'s tokens; layers ask for them with `rows`."""
        if self._fetch is not None:
            raise RuntimeError("a lookup fetch is already open: one forward at a time per model")
        self._fetch = _Fetch(self, idx_BT)
        try:
            yield self._fetch
        finally:
            self._fetch.close()
            self._fetch = None

    def rows(self, layer_idx: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self._fetch is None:
            raise RuntimeError("table rows requested outside a forward of the lookup model")
        return self._fetch.rows(layer_idx, device, dtype)

    def will_need(self, ids_U: torch.Tensor) -> None:
        """Start reading the rows of tokens `ids_U` (mmap storage) into the page cache."""
        if self._fd is None or not hasattr(os, "posix_fadvise"):
            return
        row = self.shape[1] * self.shape[2]
        ids = sorted(set(ids_U.tolist()))
        lo = 0
        for k in range(1, len(ids) + 1):  # one call per run of consecutive token ids
            if k == len(ids) or ids[k] != ids[k - 1] + 1:
                os.posix_fadvise(self._fd, ids[lo] * row, (ids[k - 1] - ids[lo] + 1) * row,
                                 os.POSIX_FADV_WILLNEED)
                lo = k

    def evict(self) -> None:
        """Drop the table's pages from this mapping and the page cache (cold-read benchmarks)."""
        if self._mm is not None:
            self._mm.madvise(mmap.MADV_DONTNEED)
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.table_VLR = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a tensor still views the mapping; it closes with it
                pass
            os.close(self._fd)
            self._mm = self._fd = None


def _resolve_storage(storage: str, device: torch.device, size: int) -> str:
    if storage not in STORAGES:
        raise ConfigError(f"lookup storage {storage!r}: allowed {', '.join(STORAGES)}")
    if storage != "auto":
        return storage
    if device.type == "cuda":
        return "pinned"
    return "ram" if size <= RAM_AUTO_MAX_BYTES else "mmap"


class _Fetch:
    """One forward's rows: distinct tokens once, each distinct layer once, in schedule order."""

    def __init__(self, tables: LookupTables, idx_BT: torch.Tensor):
        self.t = tables
        self.shape_BT = tuple(idx_BT.shape)
        ids_S = idx_BT.reshape(-1).cpu()
        self.inv_S = None  # flat token -> its row of uniq_U; None: rows are in token order
        if ids_S.numel() > DEDUP_MIN_TOKENS:  # prefill / scoring: each distinct token once
            ids_S, inv = torch.unique(ids_S, return_inverse=True)
            self.inv_S = inv.to(idx_BT.device)
        self.uniq_U = ids_S
        self.done: dict[int, torch.Tensor] = {}  # dequantised rows, (U, N, d) per layer
        self.pending: dict[int, object] = {}
        layers = list(dict.fromkeys(tables.header["schedule"]))
        target = idx_BT.device
        if tables.storage == "device":
            return  # gathered on the device when asked
        if tables.storage == "mmap":
            # Announce every token's whole row (all layers, contiguous): the kernel starts one
            # read per token, all in flight at once, and returns; the disk works while the
            # embedding and the first attention compute. Without it, MADV_RANDOM turns the
            # reads into one 4 KiB page fault per (token, layer), one after the other.
            tables.will_need(self.uniq_U)
            if target.type == "cuda":  # gather + copy of layer l+1 overlap layer l's compute
                for layer in layers:
                    self.pending[layer] = tables._pool.submit(self._read, layer, target)
            # on CPU each layer's rows are gathered when the layer asks (rows): by then their
            # pages are in, or on their way. (A reader thread per layer was measured: its
            # hand-offs cost more of a decode step than it hid.)
        elif target.type == "cuda":  # pinned: per-layer copies on the side stream (pipelined)
            for layer in layers:
                self.pending[layer] = self._read(layer, target)
        else:  # RAM: one gather of every layer's rows (contiguous per token), a memcpy
            rec_ULR = tables.table_VLR.index_select(0, self.uniq_U)
            tables.bytes_read += rec_ULR.numel()
            for layer in layers:
                self.pending[layer] = (rec_ULR[:, layer], None)

    def _read(self, layer: int, target: torch.device):
        rec_UR = self.t.table_VLR[:, layer].index_select(0, self.uniq_U)
        self.t.bytes_read += rec_UR.numel()
        if target.type != "cuda":
            return rec_UR, None
        # page-locked staging buffer per layer, reused once its previous copy has finished
        buf, last = self.t._staging.get(layer, (None, None))
        if last is not None:
            last.synchronize()
        U = rec_UR.shape[0]
        if buf is None or buf.shape[0] < U:
            buf = torch.empty((max(U, 64), rec_UR.shape[1]), dtype=torch.uint8, pin_memory=True)
        buf[:U].copy_(rec_UR)
        stream = self.t._stream
        with torch.cuda.stream(stream):
            dev_UR = buf[:U].to(target, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        self.t._staging[layer] = (buf, event)
        return dev_UR, event

    def rows(self, layer: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if layer not in self.done:
            if self.t.storage == "device":
                u = self.uniq_U.to(self.t.table_VLR.device)
                rec_UR, event = self.t.table_VLR[:, layer].index_select(0, u), None
            elif layer in self.pending:
                job = self.pending.pop(layer)
                rec_UR, event = job.result() if isinstance(job, Future) else job
            else:  # mmap on CPU: read now (the readahead was started with the fetch)
                rec_UR, event = self._read(layer, device)
            if event is not None:
                torch.cuda.current_stream(device).wait_event(event)
                rec_UR.record_stream(torch.cuda.current_stream(device))
            self.done[layer] = self.t.codec.decode(rec_UR.to(device), dtype)
        v_UND = self.done[layer]
        N, D = v_UND.shape[1:]
        if self.inv_S is not None:
            v_UND = v_UND.index_select(0, self.inv_S.to(device))
        return v_UND.view(*self.shape_BT, N, D)

    def close(self) -> None:
        for job in self.pending.values():  # e.g. a forward that raised: let reads finish
            if isinstance(job, Future):
                job.result()


class MoLELookupLM(MoELM):
    """MoELM with `mole_lookup` FFNs whose rows come from `tables` (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, tables: LookupTables):
        if cfg.ffn.kind != "mole_lookup":
            raise ConfigError(f"MoLELookupLM needs model.ffn.kind 'mole_lookup', got "
                              f"{cfg.ffn.kind!r} (see lookup_config)")
        super().__init__(cfg)
        self.tables = tables
        for block in self.layers:
            block.ffn.source = tables

    def forward(self, idx_BT, targets_BT=None, cache=None, diagnostics=False, stats=None,
                last_only=False):
        with self.tables.fetch(idx_BT):
            return super().forward(idx_BT, targets_BT, cache=cache, diagnostics=diagnostics,
                                   stats=stats, last_only=last_only)


def load_converted(path: str | Path, storage: str = "auto", device: str | torch.device = "cpu",
                   check: bool = False) -> MoLELookupLM:
    """The lookup model of a directory written by `convert_mole_lut` (eval mode).
    check=True verifies every file's sha256 first (reads the whole table)."""
    from safetensors.torch import load_model as st_load_model

    path = Path(path).expanduser()
    header = read_header(path)
    if check:
        verify(path)
    try:
        cfg = Config.from_dict(json.loads((path / "config.json").read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: config.json is missing") from None
    m = cfg.model
    want = (m.vocab_size, m.n_distinct_layers, m.ffn.n_experts, m.d_model)
    got = (header["vocab_size"], header["n_layers"], header["n_experts"], header["d_model"])
    if want != got:
        raise CheckpointError(f"{path}: tables (vocab, layers, experts, d) = {got} do not match "
                              f"config.json {want}")
    device = torch.device(device)
    tables = LookupTables(path, header, storage, device)
    model = MoLELookupLM(lookup_config(cfg).model, tables)
    try:
        st_load_model(model, str(path / "model.safetensors"), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}/model.safetensors: does not fit the lookup model "
                              f"({str(e).splitlines()[-1].strip()})") from None
    return model.to(device).eval()


def load_any(path: str | Path, device: str | torch.device = "cpu", storage: str = "auto"):
    """Kept for older callers: moelab.loading.load_any opens every kind of model directory."""
    from moelab.loading import load_any as _load_any

    return _load_any(path, device=device, storage=storage)
