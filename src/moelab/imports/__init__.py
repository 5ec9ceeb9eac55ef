"""Importing models moelab did not train: transformers checkpoints (moelab/imports/hf.py)."""
from moelab.imports.hf import hf_model_config, import_hf, load_hf

__all__ = ["import_hf", "load_hf", "hf_model_config"]
