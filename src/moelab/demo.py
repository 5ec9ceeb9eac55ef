"""The main job (`make demo`): prepare the bundled corpus, then `moelab compare` every tiny preset
(one per architecture, plus gated attention) on the same token stream at MACs matched to
dense-tiny, evaluate them, sample from the best one and print one table.

Everything runs on 2 CPU cores with no network. Finished models are not retrained when the demo
runs again, and an interrupted model resumes from its newest checkpoint.
"""
from __future__ import annotations

import time
from pathlib import Path

DEMO_TOKENS = 300_000  # training tokens per model: the whole demo took 15.0 min on 2 idle cores (README)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(out: str = "runs/demo", presets: str | None = None, tokens: int | None = None,
             progress: bool = True, jobs: int | None = None) -> int:
    import torch

    from moelab.compare.study import run_compare, tiny_presets
    from moelab.data.prepare import prepare_data
    from moelab.data.tokenizer import load_tokenizer
    from moelab.train.checkpoint import load_model

    t0 = time.time()
    out_dir = Path(out)
    names = [p.strip() for p in presets.split(",") if p.strip()] if presets else tiny_presets()
    data_dir = out_dir / "data"
    if not (data_dir / "meta.json").is_file():
        _say(f"preparing the bundled corpus into {data_dir} (byte-level BPE, 8192 tokens)")
        prepare_data(corpus="default", tokenizer="bpe:8192", out=data_dir, progress=progress)
    n_tokens = tokens or DEMO_TOKENS
    # two one-thread models at once: 899 s against 1,041 s for one two-thread model at a time
    # on 2 cores (README), as evaluation and the serial parts of each step overlap
    jobs = jobs if jobs is not None else (2 if torch.get_num_threads() >= 2 else 1)
    _say(f"comparing {len(names)} models on {n_tokens:,} training tokens each: {', '.join(names)}")
    rows = run_compare(names, data_dir, n_tokens, out_dir / "compare", match_ref="dense-tiny",
                       progress=progress, jobs=jobs)
    best = min(rows, key=lambda r: r["val_ppl"])
    model, _, _ = load_model(out_dir / "compare" / best["model"])
    tok = load_tokenizer(data_dir / "tokenizer.json")
    prompt = "KING HENRY. "
    g = torch.Generator().manual_seed(0)
    ids = model.generate(torch.tensor([tok.encode(prompt)]), 48, temperature=0.8, top_k=50,
                         eos_id=tok.eos_id, generator=g)[0].tolist()
    print()
    print((out_dir / "compare" / "results.md").read_text())
    _say(f"sample from {best['model']} (lowest validation perplexity): {tok.decode(ids)!r}")
    _say(f"done in {time.time() - t0:.0f} s; table, CSV and curves in {out_dir / 'compare'}")
    return 0
