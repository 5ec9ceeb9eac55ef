"""`moelab compare`: train several architectures on the same token stream at matched compute,
evaluate them, and write one table, one CSV and one set of curves."""
from moelab.compare.matching import match_macs
from moelab.compare.study import run_compare

__all__ = ["match_macs", "run_compare"]
