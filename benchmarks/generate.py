"""Greedy generation tokens/s: moelab vs transformers on the same weights. Logic:
moelab/eval/generate_bench.py (also `moelab bench generate`).

    python benchmarks/generate.py                   # dense-tiny and moe-tiny, batch 1 and 8, fp32 and bf16
    python benchmarks/generate.py --quick --json    # smoke test
    python benchmarks/generate.py --write-results   # refresh benchmarks/RESULTS.md
"""
import sys

from moelab.eval.generate_bench import main

if __name__ == "__main__":
    sys.exit(main())
