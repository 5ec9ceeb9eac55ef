"""`train.compile` on CPU: does every tiny preset compile (inductor) and give eager's loss?

Each preset at small shapes (d 32, 2 layers, vocab 97, batch 2 x 16), training mode: the
compiled model's loss against the eager model's, then a backward through the compiled graph.
Prints one line per preset with the compile-and-run time; exits 1 if any preset fails.

    python benchmarks/compile_check.py [--presets dense-tiny,moe-tiny]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main(argv=None) -> int:
    from helpers import tiny  # the tests' small-model overrides

    from moelab.config import preset_names
    from moelab.model import MoELM
    from moelab.train.loop import compile_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=None, help="comma-separated (default: every *-tiny)")
    args = ap.parse_args(argv)
    presets = (args.presets.split(",") if args.presets
               else [p for p in preset_names() if p.endswith("-tiny")])
    torch.set_num_threads(1)
    failed = 0
    for p in presets:
        t0 = time.time()
        try:
            torch._dynamo.reset()
            torch.manual_seed(0)
            m = MoELM(tiny(base=p).model).train()
            x = torch.randint(0, 97, (2, 16))
            out = compile_model(m)(x, x)
            (out.loss + out.aux_loss).backward()
            ref = m(x, x)
            ok = torch.allclose(out.loss, ref.loss, atol=1e-5)
            failed += not ok
            print(f"{p}: {'ok' if ok else 'LOSS DIFFERS'} in {time.time() - t0:.0f} s, loss "
                  f"{float(out.loss):.6f} (eager {float(ref.loss):.6f})", flush=True)
        except Exception as e:  # report every preset, then fail
            failed += 1
            print(f"{p}: FAILED after {time.time() - t0:.0f} s: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
