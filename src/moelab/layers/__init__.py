"""Layers. Importing this package registers every built-in attention, FFN, router and norm kind."""
from moelab.layers import norms, routers, attention, ffn, moe  # noqa: F401
