"""The transformers modeling code that `moelab.export.hf.export_hf` copies next to the weights
(`configuration_moelab.py`, `modeling_moelab.py`). A package, so the files ship with moelab;
importing it needs `transformers` only when one of the two modules is imported."""
