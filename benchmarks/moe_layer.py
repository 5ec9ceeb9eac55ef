"""MoE layer vs same-FLOPs dense FFN, forward+backward on CPU. Logic: moelab/ops/bench.py.

    python benchmarks/moe_layer.py                  # full table (8192 tokens, ~2-4 min on 2 cores)
    python benchmarks/moe_layer.py --quick --json   # smoke test
    python benchmarks/moe_layer.py --write-results  # refresh benchmarks/RESULTS.md
"""
import sys

from moelab.ops.bench import main, run_benchmark  # noqa: F401  (re-exported for importers)

if __name__ == "__main__":
    sys.exit(main())
