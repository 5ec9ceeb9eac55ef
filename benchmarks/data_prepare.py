"""Data prepare throughput and peak memory vs corpus size, against in-memory encode_batch.
Logic: moelab/data/bench.py.

    python benchmarks/data_prepare.py                                  # 0.25, 0.5, 1, 2 GB
    python benchmarks/data_prepare.py --sizes-gb 0.01 --json           # smoke test
    python benchmarks/data_prepare.py --sizes-gb 0.25 0.5 1 --write-results
"""
import sys

from moelab.data.bench import main, run_benchmark  # noqa: F401  (re-exported)

if __name__ == "__main__":
    sys.exit(main())
