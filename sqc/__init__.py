"""sqc: SqueezeLLM-style dense-and-sparse quantization as a compiler.

>>> import sqc
>>> cfg = sqc.QuantConfig(bits=3, outlier_pct=0.40, sensitive_pct=0.05)

``sqc.compile(model, example_inputs, config=..., calibration=..., target=...)``
returns a drop-in model; ``sqc.save`` / ``sqc.load`` write and read artifacts.

Importing sqc registers its ``torch.library`` ops and installs one import hook: when transformers later
imports its quantizer registry, sqc's Hugging Face quantizer registers itself, so that
``AutoModelForCausalLM.from_pretrained`` reads sqc folders without ``import sqc`` importing transformers
(about 3 s) or the user calling a registration function (:func:`sqc.hf.register_with_transformers`).
``sqc.compile`` / ``sqc.compile_pretrained`` import the compiler on first use: loading a saved model
(``sqc.load``, ``from_pretrained``) never imports it.
"""
from .artifact import ArtifactError, load, save
from .compiled import CompiledModel
from .config import PRESETS, QuantConfig, TableDType
from .trace import TraceError
from .hf import register_with_transformers as _register_with_transformers

# cheap: transformers' quantizer registry learns quant_method "sqc" when transformers imports it
_register_with_transformers()


def __getattr__(name: str):
    if name == "compile":  # the compiler (passes, codegen) loads on first use
        from .compiler import compile

        return compile
    if name == "compile_pretrained":
        from .lazy import compile_pretrained

        return compile_pretrained
    raise AttributeError(f"module 'sqc' has no attribute {name!r}")

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
