"""sqc: SqueezeLLM-style dense-and-sparse quantization as a compiler.

>>> import sqc
>>> cfg = sqc.QuantConfig(bits=3, outlier_pct=0.40, sensitive_pct=0.05)

``sqc.compile(model, example_inputs, config=..., calibration=..., target=...)``
returns a drop-in model; ``sqc.save`` / ``sqc.load`` write and read artifacts.

Two thread pools share the cores at run time: torch's OpenMP pool and TVM's.
Each spins for a while after its work, which stalls the other one: measured
here, a torch op followed by a generated kernel took 4 ms instead of 0.2 ms.
Importing sqc therefore sets short spin counts for both (``GOMP_SPINCOUNT``
and ``TVM_THREAD_POOL_SPIN_COUNT``, 1000 each) unless they are already set.
OpenMP reads its variable when torch is first imported: import sqc before
torch, or export ``GOMP_SPINCOUNT=1000`` yourself.
"""
import os as _os

_os.environ.setdefault("GOMP_SPINCOUNT", "1000")
_os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "1000")

from .compiler import CompiledModel, compile
from .config import PRESETS, QuantConfig, TableDType
from .artifact import ArtifactError, load, save
from .trace import TraceError
from .hf import register_with_transformers as _register_with_transformers

# cheap: transformers' quantizer registry learns quant_method "sqc" when transformers imports it
_register_with_transformers()

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
