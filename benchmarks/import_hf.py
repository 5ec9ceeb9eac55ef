"""Import time and peak memory of `moelab import hf` for a model of about 1 GB.

Writes a Llama-architecture model with random weights through transformers' own classes
(`save_pretrained`, float32, shards of at most --shard-mb MB), then runs, each in a fresh
process so that peak resident memory (ru_maxrss) is the command's own:

- moelab import hf:  `moelab.import_hf(DIR, RUN)` (the tensors streamed to RUN);
- moelab load:       `moelab.train.checkpoint.load_model(RUN)` (the imported run in memory);
- transformers load: `AutoModelForCausalLM.from_pretrained(DIR)`, for comparison.

Each process resets its peak-RSS counter after its imports (/proc/self/clear_refs), so the
peak is the step's; the growth over the RSS before the step is reported as a multiple of the
model's bytes on disk.

    python benchmarks/import_hf.py [--layers 16] [--shard-mb 300] [--no-write] [--keep DIR]

The table is printed and written to benchmarks/RESULTS.md between the
`<!-- import_hf:start -->` / `<!-- import_hf:end -->` markers.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moelab.bench_results import cpu_features, cpu_name, load_average, write_section

CHILD = r"""
import json, sys, time
what, src, run = sys.argv[1:4]
import torch, moelab, moelab.imports, moelab.train.checkpoint
if what == "transformers":
    import transformers


def status(key):  # kB
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])


open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the peak of what follows
before = status("VmRSS")
t1 = time.perf_counter()
if what == "import":
    moelab.import_hf(src, run)
elif what == "load":
    model, cfg, ckpt = moelab.train.checkpoint.load_model(run)
elif what == "transformers":
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
t2 = time.perf_counter()
print(json.dumps({"seconds": t2 - t1, "before_kb": before, "peak_kb": status("VmHWM")}))
"""


def run_child(what: str, src: Path, run: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, what, str(src), str(run)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_model(src: Path, layers: int, shard_mb: int) -> tuple[int, int]:
    """A random float32 Llama of about 1 GB; returns (parameters, bytes of weights on disk)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(src, max_shard_size=f"{shard_mb}MB")
    n = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    return n, size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--shard-mb", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", help="write the model here and keep it (default: a temp dir)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    load = load_average()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="moelab-bench-"))
    src, run = root / "hf", root / "run"
    t0 = time.perf_counter()
    n_params, size = write_model(src, args.layers, args.shard_mb)
    write_s = time.perf_counter() - t0
    shards = len(list(src.glob("*.safetensors")))
    rows = {}
    for what in ("import", "load", "transformers"):
        rows[what] = run_child(what, src, run, args.threads)
    lines = [
        "## Import of a transformers checkpoint (`moelab import hf`)", "",
        f"Command: `python benchmarks/import_hf.py --layers {args.layers} --shard-mb "
        f"{args.shard_mb} --threads {args.threads}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}, CPU: {cpu_name()} ({cpu_features()}), "
        f"{os.cpu_count()} cores, OMP threads {args.threads}, 1-minute load average before the "
        f"run: {load} (other processes sharing the cores slow every row)  ",
        f"Model: LlamaForCausalLM with random weights written by transformers "
        f"(`save_pretrained`, {args.layers} layers, d 1024, FFN 2816, vocab 32000, untied), "
        f"{n_params / 1e6:.1f} M parameters, float32, {size / 2**30:.3f} GiB in {shards} "
        f"safetensors shard(s) (written in {write_s:.1f} s). Each row is a fresh process that "
        "imports its libraries, resets its peak-RSS counter (/proc/self/clear_refs), then runs "
        "the step: 'before' is its RSS then, 'peak' its VmHWM after the step, 'growth' = "
        "peak - before (the memory the step itself took).", "",
        "| step | seconds | RSS before (MiB) | peak RSS (MiB) | growth (MiB) | growth / model size |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {"import": "moelab import hf (streamed to a run)",
             "load": "moelab load_model of the imported run",
             "transformers": "transformers from_pretrained (for comparison)"}
    for what, r in rows.items():
        growth = r["peak_kb"] - r["before_kb"]
        lines.append(f"| {names[what]} | {r['seconds']:.2f} | {r['before_kb'] / 1024:,.0f} | "
                     f"{r['peak_kb'] / 1024:,.0f} | {growth / 1024:,.0f} | "
                     f"{growth * 1024 / size:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        print(f"wrote {write_section('import_hf', text)}")
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
