"""sqc: SqueezeLLM-style dense-and-sparse quantization as a compiler.

>>> import sqc
>>> cfg = sqc.QuantConfig(bits=3, outlier_pct=0.40, sensitive_pct=0.05)

``sqc.compile(model, example_inputs, config=..., calibration=..., target=...)``
returns a drop-in model; ``sqc.save`` / ``sqc.load`` write and read artifacts.
"""
from .compiler import CompiledModel, compile
from .config import PRESETS, QuantConfig, TableDType
from .runtime.artifact import ArtifactError, load, save
from .trace import TraceError

__all__ = [
    "compile",
    "save",
    "load",
    "QuantConfig",
    "TableDType",
    "PRESETS",
    "CompiledModel",
    "ArtifactError",
    "TraceError",
]
__version__ = "0.1.0"
