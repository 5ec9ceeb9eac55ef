"""The main job (`make demo`): prepare the bundled corpus, train the tiny presets, evaluate them,
sample from each, and print one table.

Everything runs on 2 CPU cores with no network. A finished model is not retrained when the demo is
run again (its run directory is reused), so an interrupted demo resumes where it stopped.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from moelab.config import load_preset, preset_names
from moelab.flops import count, human

DEFAULT_PRESETS = ("dense-tiny", "gated-tiny", "moe-tiny", "sigma-moe-tiny")


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(out: str = "runs/demo", presets: str | None = None, steps: int | None = None,
             progress: bool = True) -> int:
    import torch

    from moelab.data.prepare import prepare_data
    from moelab.data.tokenizer import load_tokenizer
    from moelab.eval.perplexity import evaluate_run
    from moelab.train.checkpoint import load_model
    from moelab.train.loop import train

    t0 = time.time()
    out_dir = Path(out)
    names = ([p.strip() for p in presets.split(",") if p.strip()] if presets
             else [p for p in DEFAULT_PRESETS if p in preset_names()])
    data_dir = out_dir / "data"
    if not (data_dir / "meta.json").is_file():
        _say(f"preparing the bundled corpus into {data_dir} (byte-level BPE, 8192 tokens)")
        prepare_data(corpus="default", tokenizer="bpe:8192", out=data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    tok = load_tokenizer(data_dir / "tokenizer.json")

    rows = []
    for name in names:
        cfg = load_preset(name)
        run_dir = out_dir / name
        n_steps = steps or cfg.train.steps
        summary_file = run_dir / "summary.json"
        if summary_file.is_file() and json.loads(summary_file.read_text()).get("steps") == n_steps:
            _say(f"{name}: already trained ({run_dir}), reusing it")
            summary = json.loads(summary_file.read_text())
        else:
            _say(f"{name}: training {n_steps} steps of {cfg.train.batch_size} x "
                 f"{cfg.train.seq_len} tokens")
            resume = (run_dir / "checkpoints").is_dir()
            summary = train(cfg, data_dir=str(data_dir), out_dir=str(run_dir), steps=n_steps,
                            resume=resume, progress=progress, device="cpu")
            summary_file.write_text(json.dumps(summary, indent=2))
        ev = evaluate_run(str(run_dir), split="val", device="cpu")
        model, _, _ = load_model(run_dir)
        prompt = "KING HENRY. "
        ids = torch.tensor([tok.encode(prompt)])
        g = torch.Generator().manual_seed(0)
        sample = tok.decode(model.generate(ids, 40, temperature=0.8, top_k=50, eos_id=tok.eos_id,
                                           generator=g)[0].tolist())
        counts = count(cfg.model, seq_len=cfg.train.seq_len)
        rows.append({
            "preset": name,
            "params": counts["params_total"],
            "active": counts["params_active"],
            "macs_per_token": counts["macs_per_token"],
            "tokens": summary["tokens"],
            "tokens_per_s": summary["tokens_per_s"],
            "val_ppl": ev["perplexity"],
            "sample": sample,
        })
        _say(f"{name}: val perplexity {ev['perplexity']:.2f}; sample: {sample!r}")

    table = format_table(rows, meta)
    (out_dir / "results.md").write_text(table + "\n")
    (out_dir / "results.json").write_text(json.dumps(rows, indent=2))
    print()
    print(table)
    _say(f"done in {time.time() - t0:.0f} s; table in {out_dir / 'results.md'}")
    return 0


def format_table(rows: list[dict], meta: dict) -> str:
    head = ("| model | params | active | MACs/token | tokens seen | tokens/s | val perplexity |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head] + [
        f"| {r['preset']} | {human(r['params'])} | {human(r['active'])} | "
        f"{human(r['macs_per_token'])} | {human(r['tokens'])} | {r['tokens_per_s']:,.0f} | "
        f"{r['val_ppl']:.2f} |" for r in rows]
    lines.append(f"\nValidation: {meta.get('tokens', {}).get('val', '?'):,} held-out tokens of the "
                 f"bundled corpus (documents never seen in training).")
    return "\n".join(lines)
