"""moelab command line: train | eval | report | generate | compare | info | data | import |
export | convert | bench | demo.

Every command reports user mistakes (`MoelabError`: config, data, checkpoint) as one line on stderr
with exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from moelab.errors import MoelabError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="named preset (see `moelab info --list`)")
    p.add_argument("--config", help="YAML or JSON config file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key, e.g. model.d_model=256 (repeatable)")


# `moelab bench NAME`: the module whose main(argv) runs it, its help, and its options' help
BENCHMARKS = {
    "moe-layer": ("moelab.ops.bench", "MoE FFN layer vs a dense FFN of equal FLOPs",
                  "options of benchmarks/moe_layer.py"),
    "mole-decode": ("moelab.export.mole_bench",
                    "per-token decode latency: dense, MoE (RAM and offloaded), MoLE lookup "
                    "tables (RAM and disk)",
                    "options of benchmarks/mole_decode.py (--quick, --json, --threads N, "
                    "--write-results, ...)"),
    "generate": ("moelab.eval.generate_bench",
                 "greedy generate tokens/s vs transformers (Llama, Qwen2-MoE) with the same "
                 "weights",
                 "options of benchmarks/generate.py (--quick, --json, --models, --batches, "
                 "--dtypes, --write-results, ...)"),
    "data-prepare": ("moelab.data.bench",
                     "prepare throughput and peak memory vs corpus size, against in-memory "
                     "encode_batch", "options of benchmarks/data_prepare.py (--sizes-gb, "
                                     "--workers, ...)"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moelab", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameters and MACs of a model")
    _model_args(p)
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: max_seq_len)")
    p.add_argument("--full-attention", action="store_true",
                   help="count the full T^2 attention matmuls, as the papers' profilers do")
    p.add_argument("--baseline", help="dense preset to compare MACs with (default: the family's "
                                      "dense baseline, e.g. moeut-dense-244m for moeut-244m)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--world", type=int, metavar="W",
                   help="also show the training state per process (float32 weights, grads and "
                        "AdamW moments) on W processes under ddp, fsdp and ep")
    p.add_argument("--save", metavar="FILE",
                   help="also write the resolved config (preset + --set) to FILE (.yaml or "
                        ".json): a new combination for `train --config` or `compare --presets`")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="sample text from a trained run or an untrained preset")
    p.add_argument("run_dir", nargs="?",
                   help="run, checkpoint or converted MoLE directory (moelab convert mole-lut)")
    _model_args(p)
    p.add_argument("--prompt", default="", help="prompt text")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the run's; bytes for a preset)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    _storage_arg(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("data", help="prepare token shards")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("prepare", help="tokenize a corpus into train/val/test shards")
    q.add_argument("--corpus", default="default",
                   help="default | PATH (.txt/.jsonl/.jsonl.xz/.parquet, folder, saved HF dataset)"
                        " | hf:NAME[:CONFIG]")
    q.add_argument("--tokenizer", default="bpe:8192", help="bpe:VOCAB | PATH/tokenizer.json")
    q.add_argument("--out", required=True)
    q.add_argument("--seed", type=int, default=0)
    _data_prepare_args(q)
    q.set_defaults(func=cmd_data_prepare)
    q = dsub.add_parser("merge", help="join the data dirs of `prepare --part I/N` into one")
    q.add_argument("parts", nargs="+", help="the part directories (any order)")
    q.add_argument("--out", required=True)
    q.add_argument("--copy", action="store_true", help="copy shards instead of hard-linking")
    q.set_defaults(func=cmd_data_merge)
    q = dsub.add_parser("verify", help="check every shard's size and SHA-256 against meta.json")
    q.add_argument("data_dir")
    q.set_defaults(func=cmd_data_verify)

    p = sub.add_parser("train", help="train a model")
    _model_args(p)
    p.add_argument("--data", required=True, help="directory written by `moelab data prepare`")
    p.add_argument("--out", required=True, help="run directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, help="optimizer steps (overrides train.steps)")
    g.add_argument("--tokens", type=int, help="training tokens (converted to steps)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--init-from", metavar="DIR",
                   help="start from the weights of a model directory (a run, `moelab import hf` "
                        "output, a transformers or exported directory) with a fresh optimizer; "
                        "its model config is used unless --preset/--config is given")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (re-runs itself under torchrun)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="perplexity, built-in zero-shot tasks, lm-evaluation-harness")
    p.add_argument("run_dir", help="run, checkpoint or converted MoLE directory (perplexity only)")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--data", help="data directory (default: the one the run was trained on)")
    p.add_argument("--tasks", help="built-in zero-shot tasks instead of perplexity: cloze,minpairs")
    p.add_argument("--lm-eval", dest="lm_eval", metavar="TASKS",
                   help="run lm-evaluation-harness tasks in-process (e.g. moelab_cloze)")
    p.add_argument("--include-path", help="extra lm-eval task directory")
    p.add_argument("--limit", type=int, default=None, help="items per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")
    _storage_arg(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="figures and a markdown summary of a run")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output directory (default RUN_DIR/report)")
    p.add_argument("--data", help="data directory for the held-out diagnostics")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="train several architectures side by side at matched compute")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--presets", help="comma-separated preset names or YAML/JSON config files "
                                     "(a file member is named by its stem); NAME@sN trains "
                                     "that member at seed N only, whatever --seeds says")
    g.add_argument("--all-tiny", action="store_true", help="every *-tiny preset")
    p.add_argument("--data", required=True, help="directory written by `moelab data prepare`")
    p.add_argument("--tokens", type=int, required=True, help="training tokens per model")
    p.add_argument("--out", required=True)
    p.add_argument("--match-macs", metavar="REF",
                   help="adjust each model's free size knob to REF's forward MACs/token (+-5%%)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every model (e.g. train.batch_size=8)")
    p.add_argument("--tasks", default="cloze,minpairs", help="zero-shot tasks ('' for none)")
    p.add_argument("--task-limit", type=int, default=200, help="items per zero-shot task")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the table, CSV and curves of the finished models")
    p.add_argument("--jobs", type=int, default=1,
                   help="members trained at once in worker processes, CPU threads split "
                        "between them (default 1)")
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda: where members train and are evaluated")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="export a run to other formats")
    esub = p.add_subparsers(dest="export_command", required=True)
    q = esub.add_parser("hf", help="HF transformers directory (AutoModelForCausalLM, trust_remote_code)")
    q.add_argument("run_dir")
    q.add_argument("--out", required=True)
    q.add_argument("--tokenizer", help="tokenizer.json (default: the run's)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds an earlier export (never another directory)")
    q.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("import", help="import a model moelab did not train as a run directory")
    isub = p.add_subparsers(dest="import_command", required=True)
    q = isub.add_parser("hf", help="a local transformers model directory (config.json, "
                                   "safetensors, tokenizer.json; never a hub download)")
    q.add_argument("hf_dir")
    q.add_argument("--out", required=True, help="run directory to write")
    q.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16", "float16"],
                   help="stored weights (default: the checkpoint's own dtype)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("convert", help="convert a trained run into another inference form")
    csub = p.add_subparsers(dest="convert_command", required=True)
    q = csub.add_parser("mole-lut", help="re-parameterise a MoLE run's experts into lookup "
                                         "tables (MoLE sec. 3.3)")
    q.add_argument("run_dir", help="MoLE run (ffn.kind: mole) or one of its checkpoints")
    q.add_argument("--out", required=True, help="directory to write (must not exist)")
    q.add_argument("--dtype", default="fp16", metavar="{fp16,bf16,fp32,int8,nf4}",
                   help="table encoding (default fp16, as the paper)")
    q.add_argument("--block-size", type=int, default=None,
                   help="nf4 only: values per absmax scale (default: one (token, expert) row "
                        "of d_model values, the paper's token-wise blocks)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.set_defaults(func=cmd_convert_mole_lut)

    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="bench_command", required=True)
    for name, (_, help_text, rest_help) in BENCHMARKS.items():
        q = bsub.add_parser(name, help=help_text)
        q.add_argument("rest", nargs=argparse.REMAINDER, help=rest_help)
        q.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the main job: prepare data, train, evaluate, sample")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--presets", default=None, help="comma-separated presets (default: every *-tiny)")
    p.add_argument("--tokens", type=int, default=None, help="training tokens per model")
    p.add_argument("--jobs", type=int, default=None,
                   help="models trained at once (default: 2 when there are 2+ CPU threads)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return ap


def _data_prepare_args(q: argparse.ArgumentParser) -> None:
    from moelab.data.prepare import DEFAULT_BPE_SAMPLE_CHARS, SPLIT_METHODS
    from moelab.data.shards import DEFAULT_SHARD_TOKENS

    q.add_argument("--workers", type=int, default=None,
                   help="encoding processes (default: the CPU count, 1 for a tiny corpus; "
                        "the output does not depend on it)")
    q.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS})")
    q.add_argument("--split", default="auto", choices=SPLIT_METHODS,
                   help="how documents are assigned to train/val/test (docs/data.md)")
    q.add_argument("--val-fraction", type=float, default=0.02)
    q.add_argument("--test-fraction", type=float, default=0.02)
    q.add_argument("--bpe-sample-chars", type=int, default=DEFAULT_BPE_SAMPLE_CHARS,
                   help=f"bpe:VOCAB trains on this many train characters (default "
                        f"{DEFAULT_BPE_SAMPLE_CHARS:,})")
    q.add_argument("--part", metavar="I/N",
                   help="prepare only part I of N (0-based) of the corpus; join with `data merge`")


def _storage_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default=None, metavar="{auto,ram,mmap}",
                   help="converted MoLE directory only: where the lookup tables live (auto: RAM "
                        "up to 1 GiB, else memory-mapped from disk; pinned/device on CUDA)")


def _parse_args(raw: list[str]) -> argparse.Namespace:
    ap = build_parser()
    if len(raw) >= 2 and raw[0] == "bench" and not raw[1].startswith("-"):
        # a benchmark parses its own options: hand it everything after `bench NAME` verbatim
        # (argparse's REMAINDER does not take arguments that start with `--` in a subcommand)
        args = ap.parse_args(raw[:2])
        args.rest = raw[2:]
        return args
    return ap.parse_args(raw)


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else list(argv)
    args = _parse_args(raw)
    args.raw_argv = raw
    try:
        return args.func(args) or 0
    except MoelabError as e:
        print(f"moelab: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused (read-only, full disk, a file in the way)
        from moelab.fsutil import describe_os_error

        print(f"moelab: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moelab: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    from moelab.config import load_preset, preset_names, resolve_config
    from moelab.errors import ConfigError
    from moelab.flops import count, human

    if args.list:
        for name in preset_names():
            c = load_preset(name).model
            n = count(c, seq_len=min(c.max_seq_len, 1024))
            print(f"{name:32s} attention={c.attention.kind:10s} ffn={c.ffn.kind:10s} "
                  f"params={human(n['params_total']):>8s} active={human(n['params_active']):>8s}")
        return 0
    cfg = resolve_config(args.preset, args.config, args.sets)
    if args.save:
        save = Path(args.save)
        if save.suffix not in (".yaml", ".yml", ".json"):
            raise ConfigError(f"--save {save}: expected a .yaml, .yml or .json file name")
        if args.preset and (args.sets or cfg.name == "custom"):
            cfg.name = save.stem  # the file is a new model, not the preset
        cfg.save(save)
    res = count(cfg.model, batch=args.batch, seq_len=args.seq, full_attention=args.full_attention)
    res = {"name": cfg.name, **res}
    if args.world is not None:
        from moelab.train.memory import state_per_rank

        if args.world < 1:
            raise ConfigError(f"--world {args.world}: expected a positive number of processes")
        res["training_state"] = {"world": args.world,
                                 **state_per_rank(cfg.model, args.world, cfg.train.ep_size)}
    base_name = args.baseline or dense_baseline(cfg.name)
    if base_name and base_name != cfg.name:
        base = count(load_preset(base_name).model, batch=args.batch, seq_len=res["seq_len"],
                     full_attention=args.full_attention)
        res["baseline"] = {"name": base_name, "macs_forward": base["macs_forward"],
                           "params_total": base["params_total"],
                           "macs_ratio": res["macs_forward"] / base["macs_forward"]}
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    m = cfg.model
    print(f"{cfg.name}: attention={m.attention.kind} ffn={m.ffn.kind} d_model={m.d_model} "
          f"n_layers={m.n_layers} (distinct {m.n_distinct_layers}) vocab={m.vocab_size}")
    print(f"  params total  {res['params_total']:>15,d}  ({human(res['params_total'])})")
    print(f"  params active {res['params_active']:>15,d}  ({human(res['params_active'])})")
    print(f"  forward MACs  {res['macs_forward']:>15,d}  ({human(res['macs_forward'])}) for batch "
          f"{res['batch']} x {res['seq_len']} tokens, "
          f"{'full' if args.full_attention else 'causal'} attention; "
          f"{human(res['macs_per_token'])} per token")
    for k, v in sorted(res["components"]["macs"].items(), key=lambda kv: -kv[1]):
        print(f"    {k:24s} {human(v):>9s}  {100 * v / res['macs_forward']:5.1f}%")
    if "training_state" in res:
        st = res["training_state"]
        print(f"  training state per process on {st['world']} (fp32 weights + grads + AdamW; "
              "activations not included):")
        for kind in ("ddp", "fsdp", "ep"):
            if "unavailable" in st[kind]:
                print(f"    {kind:5s} not possible: {st[kind]['unavailable']}")
            else:
                print(f"    {kind:5s} {human(st[kind]['params']):>9s} params  "
                      f"{st[kind]['bytes'] / 2**20:10,.1f} MiB")
    if "baseline" in res:
        b = res["baseline"]
        print(f"  vs dense baseline {b['name']}: {b['macs_ratio']:.2f}x its forward MACs "
              f"({human(res['macs_forward'])} vs {human(b['macs_forward'])}), "
              f"{res['params_total'] / b['params_total']:.2f}x its parameters")
    return 0


def dense_baseline(name: str) -> str | None:
    """The dense preset a family's models are compared with, when it exists."""
    from moelab.config import preset_names

    if name.endswith("-tiny"):
        cand = "dense-tiny"
    elif name.startswith("moeut-") and not name.startswith("moeut-dense-"):
        cand = "moeut-dense-" + name[len("moeut-"):]
    else:  # umoe-paper-base-umoe -> umoe-paper-base-dense, mole-paper-160m-mole4e -> ...-dense
        cand = name.rsplit("-", 1)[0] + "-dense" if "-paper-" in name else None
    return cand if cand in preset_names() else None


def cmd_generate(args) -> int:
    import torch

    from moelab.errors import ConfigError
    from moelab.model import check_sampling

    # the arguments first: a typo should not wait for a model to load
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   args.num_samples)
    torch.manual_seed(args.seed)
    if args.run_dir:
        from moelab.loading import load_any
        from moelab.train.checkpoint import find_tokenizer

        _check_storage(args)
        # a converted MoLE directory gives the lookup model (its tokenizer.json is copied there)
        model, cfg, where = load_any(args.run_dir, storage=args.storage or "auto")
        tok_path = args.tokenizer or find_tokenizer(where)
    elif args.storage is not None:
        raise ConfigError(f"--storage {args.storage}: applies to a converted MoLE directory "
                          "(moelab convert mole-lut), not to an untrained preset")
    elif args.preset or args.config:
        from moelab.config import resolve_config
        from moelab.model import MoELM

        cfg = resolve_config(args.preset, args.config, args.sets)
        model = MoELM(cfg.model)
        tok_path = args.tokenizer
        print(f"(untrained {cfg.name}: sampling from random weights)", file=sys.stderr)
    else:
        raise ConfigError("generate: give a RUN_DIR, or --preset/--config for an untrained model")
    tok = _load_any_tokenizer(tok_path)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}")
    ids = tok.encode(args.prompt) or [tok.eos_id]
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long)
    g = torch.Generator().manual_seed(args.seed)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, eos_id=tok.eos_id, generator=g)
    for row in out.tolist():
        print(tok.decode(row))
    return 0


def _load_any_tokenizer(path):
    if path is None:
        from moelab.data.byte_tokenizer import ByteTokenizer

        return ByteTokenizer()
    from moelab.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


def cmd_data_prepare(args) -> int:
    from moelab.data.prepare import prepare_data
    from moelab.fsutil import check_writable

    check_writable(args.out, "--out")  # before the corpus is read and the tokenizer trained
    meta = prepare_data(corpus=args.corpus, tokenizer=args.tokenizer, out=args.out, seed=args.seed,
                        workers=args.workers, shard_tokens=args.shard_tokens, split=args.split,
                        val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                        bpe_sample_chars=args.bpe_sample_chars, part=args.part)
    counts = meta.get("tokens", {})
    print(f"wrote {args.out}: vocab {meta['vocab_size']}, tokens "
          + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    return 0


def cmd_data_merge(args) -> int:
    from moelab.data.merge import merge_parts

    meta = merge_parts(args.parts, args.out, link=not args.copy)
    print(f"wrote {args.out}: {len(args.parts)} parts, tokens "
          + ", ".join(f"{k} {v:,}" for k, v in meta["tokens"].items()))
    return 0


def cmd_data_verify(args) -> int:
    from moelab.data.shards import verify

    meta = verify(args.data_dir)
    n = sum(len(v) for v in meta["shards"].values())
    print(f"{args.data_dir}: {n} shards and the tokenizer match meta.json")
    return 0


def cmd_train(args) -> int:
    from moelab.config import resolve_config
    from moelab.train.distributed import check_launch, is_main, launch
    from moelab.train.loop import train

    if args.resume and not (args.preset or args.config) and (Path(args.out) / "config.json").is_file():
        cfg = resolve_config(None, str(Path(args.out) / "config.json"), args.sets)
    elif args.init_from and not (args.preset or args.config):
        from moelab.loading import read_model_config

        cfg = read_model_config(args.init_from).with_overrides(args.sets)
    else:
        cfg = resolve_config(args.preset, args.config, args.sets)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        from moelab.train.distributed import DistEnv
        from moelab.train.loop import LOCK_HELD_ENV, RunDirGuard

        check_launch(cfg, args.nproc)
        # this process holds the run's lock for the torchrun children it starts
        with RunDirGuard(args.out, DistEnv()) as guard:
            env = {**os.environ, LOCK_HELD_ENV: str(guard.run_dir.resolve())}
            rc = launch(args.nproc, args.raw_argv, env=env)
            if rc != 0:
                guard.discard_if_unstarted()
            return rc
    summary = train(cfg, data_dir=args.data, out_dir=args.out, steps=args.steps,
                    tokens=args.tokens, resume=args.resume, progress=not args.no_progress,
                    device=args.device, init_from=args.init_from)
    if is_main():
        print(json.dumps(summary))
    return 0


def cmd_export_hf(args) -> int:
    from moelab.export.hf import export_hf

    out = export_hf(args.run_dir, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite)
    print(f"wrote {out or args.out}")
    return 0


def cmd_import_hf(args) -> int:
    from moelab.imports import import_hf
    from moelab.train.rundir import read_run_info

    out = import_hf(args.hf_dir, args.out, dtype=args.dtype, overwrite=args.overwrite)
    info = read_run_info(out)["imported"]
    print(f"wrote {out}: {info['architecture']}, {info['bytes'] / 2**20:,.1f} MiB of weights in "
          f"{info['seconds']:.1f} s" + ("" if info["tokenizer"] else " (no tokenizer.json)"))
    return 0


def _check_storage(args) -> None:
    """--storage only means something for a converted MoLE directory; say so rather than
    silently ignoring it."""
    from moelab.errors import ConfigError
    from moelab.export.mole_model import STORAGES, is_converted_dir

    if args.storage is None:
        return
    if args.storage not in STORAGES:
        raise ConfigError(f"--storage {args.storage!r}: allowed {', '.join(STORAGES)}")
    if not is_converted_dir(args.run_dir):
        raise ConfigError(f"--storage {args.storage}: applies to a converted MoLE directory "
                          f"(moelab convert mole-lut); {args.run_dir} is not one")


def cmd_convert_mole_lut(args) -> int:
    from moelab.export.mole_lut import convert_mole_lut

    h = convert_mole_lut(args.run_dir, args.out, dtype=args.dtype, block_size=args.block_size,
                         overwrite=args.overwrite)
    V, L, R = h["shape"]
    print(f"wrote {args.out}: {h['dtype']} lookup tables, {V} tokens x {L} layers x "
          f"{h['n_experts']} experts x d {h['d_model']} = {V * L * R / 2**20:.1f} MiB, "
          f"{h['bytes_per_token']:,} bytes per token ({100 * h['storage_vs_fp16']:.1f}% of fp16)")
    return 0


def cmd_eval(args) -> int:
    from moelab.errors import ConfigError
    from moelab.export.mole_model import is_converted_dir

    device = "cpu" if args.device == "auto" else args.device
    _check_storage(args)
    if (args.tasks or args.lm_eval) and is_converted_dir(args.run_dir):
        raise ConfigError(f"{args.run_dir} is a converted MoLE directory: --tasks/--lm-eval "
                          "take the training run; the converted model gives perplexity only "
                          "(moelab eval DIR without --tasks)")
    if args.tasks or args.lm_eval:
        res = {}
        if args.tasks:
            from moelab.eval.zeroshot import run_tasks

            res["tasks"] = run_tasks(args.run_dir, _names(args.tasks), limit=args.limit,
                                     batch_size=args.batch_size, device=device)
        if args.lm_eval:
            from moelab.eval.harness import run_lm_eval

            res["lm_eval"] = run_lm_eval(args.run_dir, _names(args.lm_eval),
                                         include_path=args.include_path, limit=args.limit,
                                         batch_size=args.batch_size, device=device)
        print(json.dumps(res, indent=None if args.json else 2, default=str))
        return 0
    from moelab.eval.perplexity import evaluate_run

    res = evaluate_run(args.run_dir, split=args.split, data_dir=args.data, device=args.device,
                       storage=args.storage)
    if args.json:
        print(json.dumps(res))
    else:
        lut = res.get("lookup")
        form = (f" (lookup tables {lut['dtype']}, storage {lut['storage']})" if lut else "")
        print(f"{args.split}: perplexity {res['perplexity']:.3f}, mean per-document perplexity "
              f"{res['doc_perplexity']:.3f} over {res['tokens']:,} tokens{form}")
    return 0


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_report(args) -> int:
    from moelab.eval.report import write_report

    path = write_report(args.run_dir, out_dir=args.out, data_dir=args.data)
    print(f"wrote {path}")
    return 0


def cmd_compare(args) -> int:
    from moelab.compare.study import run_compare, tiny_presets
    from moelab.fsutil import check_writable

    check_writable(args.out, "--out")
    presets = tiny_presets() if args.all_tiny else _names(args.presets)
    try:
        seeds = tuple(int(s) for s in _names(args.seeds))
    except ValueError:
        raise MoelabError(f"--seeds {args.seeds!r}: expected comma-separated integers") from None
    run_compare(presets, args.data, args.tokens, args.out, match_ref=args.match_macs,
                seeds=seeds, sets=tuple(args.sets), tasks=tuple(_names(args.tasks)),
                task_limit=args.task_limit, progress=not args.no_progress,
                report_only=args.report_only, jobs=args.jobs, device=args.device)
    print((Path(args.out) / "results.md").read_text())
    return 0


def cmd_bench(args) -> int:
    """A benchmark parses its own options (`args.rest`, see _parse_args)."""
    import importlib

    module = importlib.import_module(BENCHMARKS[args.bench_command][0])
    return module.main(args.rest) or 0


def cmd_demo(args) -> int:
    from moelab.demo import run_demo

    return run_demo(out=args.out, presets=args.presets, tokens=args.tokens, jobs=args.jobs,
                    progress=not args.no_progress) or 0


if __name__ == "__main__":
    sys.exit(main())
