"""MoLE decode latency: dense vs MoE (RAM / offloaded) vs MoLE (RAM / disk). Logic:
moelab/export/mole_bench.py.

    python benchmarks/mole_decode.py                  # full table (~2-3 min on 2 cores)
    python benchmarks/mole_decode.py --quick --json   # smoke test
    python benchmarks/mole_decode.py --write-results  # refresh benchmarks/RESULTS.md
"""
import sys

from moelab.export.mole_bench import main, run_benchmark  # noqa: F401  (re-exported)

if __name__ == "__main__":
    sys.exit(main())
