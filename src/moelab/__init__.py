"""moelab: train, compare and run sparse mixture-of-experts language models."""
from moelab.config import Config, ModelConfig, TrainConfig, DataConfig, load_preset

__version__ = "0.1.0"

__all__ = ["Config", "ModelConfig", "TrainConfig", "DataConfig", "load_preset", "MoELM",
           "import_hf"]


def __getattr__(name):  # lazy: importing moelab does not build the layer registry
    if name == "MoELM":
        from moelab.model import MoELM

        return MoELM
    if name == "import_hf":
        from moelab.imports import import_hf

        return import_hf
    raise AttributeError(name)
