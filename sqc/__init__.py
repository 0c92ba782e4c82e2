"""sqc: SqueezeLLM-style dense-and-sparse quantization as a compiler.

>>> import sqc
>>> cfg = sqc.QuantConfig(bits=3, outlier_pct=0.40, sensitive_pct=0.05)

``sqc.compile(model, example_inputs, config=..., calibration=..., target=...)``
returns a drop-in model; ``sqc.save`` / ``sqc.load`` write and read artifacts.

The generated CPU kernels run their parallel loops on torch's OpenMP team
(see ``sqc.runtime.threads``): one thread pool, sized by
``torch.set_num_threads``. TVM's own pool serves only kernel libraries built
by an older sqc (a warning says so); importing sqc gives it a short spin count
(``TVM_THREAD_POOL_SPIN_COUNT=1000`` unless set) so that it yields the cores
quickly. OpenMP's own spinning is left alone: it keeps torch's team warm
between the many small kernel calls of a decode step (``GOMP_SPINCOUNT=1000``
made a SmolLM2 decode step twice as slow here).
"""
import os as _os

_os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "1000")

from .compiler import CompiledModel, compile
from .config import PRESETS, QuantConfig, TableDType
from .artifact import ArtifactError, load, save
from .lazy import compile_pretrained
from .trace import TraceError
from .hf import register_with_transformers as _register_with_transformers

# cheap: transformers' quantizer registry learns quant_method "sqc" when transformers imports it
_register_with_transformers()

__all__ = [
    "compile",
    "compile_pretrained",
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
