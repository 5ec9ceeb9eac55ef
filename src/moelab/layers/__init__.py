"""Layers. Importing this package registers every built-in attention, FFN, router and norm kind."""
from moelab.layers import norms, routers, attention, ffn, moe  # noqa: F401
from moelab.layers import mole  # noqa: F401,E402
from moelab.layers import switchhead, moa, umoe  # noqa: F401,E402
