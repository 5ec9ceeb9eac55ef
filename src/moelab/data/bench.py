"""`moelab bench data-prepare`: prepare throughput and peak memory against corpus size.

For each size a synthetic corpus is made from the bundled text: documents are random runs of
the bundled corpus's words with 5 % of the words replaced by random others, so no document
repeats (and the tokenizer's word cache cannot make it look faster than real text). Each point
runs `moelab data prepare` as a subprocess with a tokenizer.json trained once on the bundled
corpus (so the figure is the streaming pipeline, not BPE training) and records wall time,
characters/s, tokens/s and the peak resident memory of the whole process tree (the parent and
its encoding workers, summed, polled every 0.1 s from /proc). In the same run the physical limit
is measured: the same tokenizer's `encode_batch` (Rust threads = the worker count) on text
already in memory, a sample of the same corpus of up to `--reference-chars` characters.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from moelab.bench_results import cpu_features, cpu_name, load_average, write_section

SIZES_GB = (0.25, 0.5, 1.0, 2.0)
_REFERENCE_SCRIPT = """
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
texts, n = [], 0
with open(sys.argv[2], "rb") as f:
    for line in f:
        texts.append(json.loads(line)["text"])
        n += len(texts[-1])
        if n >= int(sys.argv[3]):
            break
t0, c0 = time.perf_counter(), time.process_time()
tokens = 0
for i in range(0, len(texts), 256):
    tokens += sum(len(e.ids) for e in tok.encode_batch(texts[i:i + 256], add_special_tokens=False))
print(json.dumps({"chars": n, "tokens": tokens, "seconds": time.perf_counter() - t0,
                  "cpu_seconds": time.process_time() - c0}))
"""


def make_corpus(path: Path, n_chars: int, seed: int = 0) -> int:
    """Write a .jsonl of about `n_chars` characters of non-repeating documents; return chars."""
    from moelab.data.corpus import load_default_corpus

    words = np.array(" ".join(d["text"] for d in load_default_corpus()).split(" "), dtype=object)
    rng = np.random.default_rng(seed)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_chars:
            batch = []
            for _ in range(256):
                n = int(rng.integers(200, 2000))
                start = int(rng.integers(0, len(words) - n))
                idx = np.arange(start, start + n)
                swap = rng.random(n) < 0.05
                idx[swap] = rng.integers(0, len(words), size=int(swap.sum()))
                text = " ".join(words[idx].tolist())
                written += len(text)
                batch.append(json.dumps({"text": text}))
            f.write("\n".join(batch) + "\n")
    return written


def _tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants.

    The tree is walked through /proc/PID/task/TID/children rather than by scanning every process
    in /proc: the poll runs beside the workers it measures and must not take their CPU.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            for task in os.listdir(f"/proc/{pid}/task"):
                todo.extend(int(c) for c in
                            Path(f"/proc/{pid}/task/{task}/children").read_text().split())
        except (OSError, ValueError, IndexError):
            pass  # the process ended while we looked
    return total


def run_prepare(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "moelab", "data", "prepare", "--corpus", str(corpus),
           "--tokenizer", str(tokenizer), "--out", str(out), "--workers", str(workers),
           "--split", "hash"]
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, TQDM_DISABLE="1"))
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    cpu = _children_cpu() - cpu0  # the prepare process and its workers (joined, so counted)
    if proc.returncode:
        raise RuntimeError(f"prepare failed: {proc.stderr.read().decode()[-2000:]}")
    meta = json.loads((out / "meta.json").read_text())
    chars, tokens = sum(meta["characters"].values()), sum(meta["tokens"].values())
    shutil.rmtree(out)
    return {"workers": workers, "chars": chars, "tokens": tokens, "seconds": seconds,
            "cpu_seconds": cpu, "chars_per_s": chars / seconds, "tokens_per_s": tokens / seconds,
            "chars_per_cpu_s": chars / cpu, "peak_rss": peak}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_reference(corpus: Path, tokenizer: Path, workers: int, n_chars: int) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(workers), TOKENIZERS_PARALLELISM="true")
    out = subprocess.run([sys.executable, "-c", _REFERENCE_SCRIPT, str(tokenizer), str(corpus),
                          str(n_chars)], capture_output=True, text=True, env=env, check=True)
    r = json.loads(out.stdout)
    return {**r, "chars_per_s": r["chars"] / r["seconds"],
            "tokens_per_s": r["tokens"] / r["seconds"],
            "chars_per_cpu_s": r["chars"] / r["cpu_seconds"]}


def run_benchmark(sizes_gb, workers: int, reference_chars: int, workdir: Path,
                  scaling: bool = True, say=print) -> dict:
    from moelab.data.prepare import prepare_data

    workdir.mkdir(parents=True, exist_ok=True)
    tok_dir = workdir / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        say("training the benchmark tokenizer (bpe:8192 on the bundled corpus)")
        prepare_data("default", "bpe:8192", out=tok_dir, workers=1, progress=False)
    tokenizer = tok_dir / "tokenizer.json"
    rows = []
    for i, gb in enumerate(sizes_gb):
        corpus = workdir / f"corpus-{gb}gb.jsonl"
        if not corpus.is_file():
            say(f"writing a {gb} GB corpus")
            make_corpus(corpus, int(gb * 1e9), seed=i)
        say(f"{gb} GB: in-memory encode_batch, {workers} threads")
        ref = run_reference(corpus, tokenizer, workers, reference_chars)
        say(f"{gb} GB: prepare, {workers} workers")
        row = {"gb": gb, **run_prepare(corpus, tokenizer, workdir / "out", workers),
               "reference": ref}
        if scaling and i == 0 and workers > 1:
            say(f"{gb} GB: prepare, 1 worker")
            row["one_worker"] = run_prepare(corpus, tokenizer, workdir / "out", 1)
            row["one_thread_reference"] = run_reference(corpus, tokenizer, 1, reference_chars)
        rows.append(row)
        say(json.dumps(row))
    return {"rows": rows, "workers": workers, "reference_chars": reference_chars}


def markdown(result: dict) -> str:
    lines = ["| text | workers | wall s | M chars/s | M tokens/s | peak RSS (tree) | CPU s "
             "(tree) | cores used | M chars per CPU s | in-memory encode_batch: M chars/s, per "
             "CPU s | prepare / in-memory: wall, CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for row, ref in ((r, r["reference"]), (r.get("one_worker"), r.get("one_thread_reference"))):
            if row is None:
                continue
            cpu_ratio = (row["chars_per_cpu_s"] / ref["chars_per_cpu_s"]
                         if "chars_per_cpu_s" in ref else float("nan"))
            lines.append(
                f"| {r['gb']} GB ({row['chars'] / 1e9:.2f} G chars) | {row['workers']} | "
                f"{row['seconds']:.0f} | {row['chars_per_s'] / 1e6:.2f} | "
                f"{row['tokens_per_s'] / 1e6:.2f} | {row['peak_rss'] / 2**20:.0f} MiB | "
                f"{row.get('cpu_seconds', float('nan')):.0f} | "
                f"{row.get('cpu_seconds', float('nan')) / row['seconds']:.2f} | "
                f"{row.get('chars_per_cpu_s', float('nan')) / 1e6:.2f} | "
                f"{ref['chars_per_s'] / 1e6:.2f}, {ref.get('chars_per_cpu_s', float('nan')) / 1e6:.2f} | "
                f"{row['chars_per_s'] / ref['chars_per_s']:.2f}x, {cpu_ratio:.2f}x |")
    return "\n".join(lines)


def verdicts(result: dict) -> list[str]:
    rows = result["rows"]
    out = []
    peaks = [r["peak_rss"] / 2**20 for r in rows]
    out.append(f"peak memory across sizes: {min(peaks):.0f}-{max(peaks):.0f} MiB "
               f"(target: flat, <= 1.5 GB at 2 GB of text)")
    ratios = [r["chars_per_s"] / r["reference"]["chars_per_s"] for r in rows]
    out.append(f"throughput / in-memory encode_batch, wall clock: {min(ratios):.2f}-"
               f"{max(ratios):.2f}x (target >= 0.8x)")
    if all("chars_per_cpu_s" in r for r in rows):
        eff = [r["chars_per_cpu_s"] / r["reference"]["chars_per_cpu_s"] for r in rows]
        out.append(f"characters per CPU second / in-memory encode_batch's: {min(eff):.2f}-"
                   f"{max(eff):.2f}x (the pipeline's own cost, whatever the machine's load)")
    for r in rows:
        cpu_min = f", {1e9 / r['chars_per_cpu_s'] / 60:.1f} CPU-minutes" \
            if "chars_per_cpu_s" in r else ""
        out.append(f"per GB of text at {r['gb']} GB: {1e9 / r['chars_per_s'] / 60:.1f} min wall "
                   f"with {r['workers']} workers{cpu_min}, "
                   f"{r['tokens'] * 2 / r['chars'] * 1e3:.0f} MB of uint16 shards")
    first = rows[0]
    if "one_worker" in first:
        out.append(f"{result['workers']} workers / 1 worker at {first['gb']} GB: "
                   f"{first['chars_per_s'] / first['one_worker']['chars_per_s']:.2f}x "
                   "(target >= 1.7x with 2)"
                   + (f"; cores actually used: {first['cpu_seconds'] / first['seconds']:.2f} vs "
                      f"{first['one_worker']['cpu_seconds'] / first['one_worker']['seconds']:.2f}"
                      if "cpu_seconds" in first else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="data-prepare", description=__doc__.split("\n")[0])
    p.add_argument("--sizes-gb", type=float, nargs="+", default=list(SIZES_GB))
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--reference-chars", type=int, default=64_000_000,
                   help="characters of the in-memory encode_batch sample")
    p.add_argument("--no-scaling", action="store_true", help="skip the 1-worker runs")
    p.add_argument("--workdir", default=None, help="keep corpora here (default: a temp dir)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--write-results", action="store_true",
                   help="replace the data_prepare section of benchmarks/RESULTS.md")
    p.add_argument("--results-file", default=None)
    p.add_argument("--from-json", metavar="FILE",
                   help="render the result a previous `--json` run printed (no measuring); "
                        "with --write-results give that run's command as --command")
    p.add_argument("--command", default=None, help="the command recorded in RESULTS.md")
    p.add_argument("--note", default=None, help="a paragraph added to the RESULTS.md section")
    args = p.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        load_before = load_average()
        tmp = None if args.workdir else tempfile.mkdtemp(prefix="moelab-bench-data-")
        workdir = Path(args.workdir or tmp)
        try:
            result = run_benchmark(args.sizes_gb, args.workers, args.reference_chars, workdir,
                                   scaling=not args.no_scaling,
                                   say=lambda m: print(f"[bench] {m}", file=sys.stderr))
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        result["load_before"], result["load_after"] = load_before, load_average()
        result["date"] = datetime.date.today().isoformat()
    print(json.dumps(result) if args.json else markdown(result) + "\n" + "\n".join(verdicts(result)))
    if args.write_results:
        command = args.command or "moelab bench data-prepare " + " ".join(
            argv if argv is not None else sys.argv[1:])
        write_section("data_prepare", results_section(result, command.strip(), args.note),
                      args.results_file)
    return 0


def results_section(result: dict, command: str, note: str | None = None) -> str:
    return "\n".join([
        "## Data prepare: streaming, parallel, sharded (`moelab bench data-prepare`)",
        "",
        f"Command: `{command}`  ",
        f"Date: {result.get('date', datetime.date.today().isoformat())}, CPU: {cpu_name()} ({cpu_features()}), "
        f"{os.cpu_count()} cores, 1-minute load average before / after: "
        f"{result['load_before']} / {result['load_after']}.  ",
        "Corpora: synthetic .jsonl made from the bundled text (random runs of its words, 5 % "
        "replaced, no repeats); tokenizer: bpe:8192 trained once on the bundled corpus and "
        "given as tokenizer.json; split hash 2 %/2 %; default shard size. Peak RSS = the "
        "prepare process plus its workers, summed. In-memory encode_batch: the same tokenizer "
        f"on the first {result['reference_chars'] / 1e6:.0f} M characters of the same corpus, "
        "already in memory, Rust threads = workers.",
        "",
        markdown(result),
        "",
        *[f"- {v}" for v in verdicts(result)],
        *(["", note] if note else []),
    ])
