"""Typed, frozen, versioned quantization config.

``QuantConfig`` is the single description of *what* sqc does to a model. It is
validated at construction, immutable, and round-trips through JSON so that an
artifact records exactly the settings it was produced with.

Presets
-------
``"w4"``, ``"w3"`` (dense only) and ``"w4-s0.45"``, ``"w3-s0.45"`` (0.40 % of the
largest-magnitude weights plus 0.05 % of the most sensitive ones kept exactly in
the sparse part) are accepted wherever a config is. Each has a ``-g`` twin
(``"w3-s0.45-g"``...) with the guided, error-compensating fit
(:mod:`sqc.quant.guided`), which needs calibration data. ``"b2.5"``,
``"b3"``, ``"b3.25"``, ``"b3.5"``, ``"b4"``, ``"b4.5"`` (and their ``-g``
twins) are size budgets in stored bits per weight with the same 0.45 %
sparse part: each layer gets 2, 3 or 4 bits by its measured sensitivity.
"""
from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any, Mapping

CONFIG_VERSION = 1

#: widths a bits budget chooses from (kernels exist for each)
BUDGET_WIDTHS = (2, 3, 4)
#: the value of a field added after version 1 that reproduces what sqc did before it existed
_BEFORE_FIELD = {"guided_shrink": 0.0}

__all__ = ["QuantConfig", "TableDType", "FitMode", "HeadFormat", "PRESETS", "resolve_config", "CONFIG_VERSION",
           "BUDGET_WIDTHS"]


class TableDType(str, enum.Enum):
    """Storage dtype of the per-row lookup tables (centroids)."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


class FitMode(str, enum.Enum):
    """How the codebooks are fitted."""

    #: Fisher-weighted k-means per row (SqueezeLLM's objective)
    KMEANS = "kmeans"
    #: k-means start, then the guided layer-output objective with error feedback (:mod:`sqc.quant.guided`)
    GUIDED = "guided"


class HeadFormat(str, enum.Enum):
    """How the output projection is stored."""

    #: int8 weights, one fp32 scale per row (:mod:`sqc.runtime.int8`)
    INT8 = "int8"
    #: left in floating point
    FLOAT = "float"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Settings of a dense-and-sparse quantization.

    Parameters
    ----------
    bits : int
        Code width of the dense part, 2..8. Each output row gets ``2**bits``
        centroids. Every layer's width, unless ``bits_per_weight`` is set.
    bits_per_weight : float or None
        A size budget instead of one width: each layer (each group of fused
        siblings) gets 2, 3 or 4 bits, chosen from measured sensitivity so
        that the quantized layers' stored bits per weight (codes, tables and
        sparse part, as :func:`sqc.artifact.artifact_bits_per_weight` counts them)
        stay within the budget (:mod:`sqc.passes.allocate_bits`). Needs
        calibration data.
    outlier_pct : float
        Percent (0..10) of each matrix's entries with the largest ``|w|`` that
        are kept exactly in the sparse part.
    sensitive_pct : float
        Percent (0..10) of each matrix's entries with the largest Fisher value
        kept exactly in the sparse part (needs calibration data; ignored,
        with a report note, without it).
    table_dtype : TableDType
        Storage dtype of the lookup tables. fp16 by default.
    kmeans_iters : int
        Lloyd refinement steps after the exact binned start. Fitting has no
        random component, so equal inputs give equal codebooks.
    skip : tuple of str
        ``fnmatch`` patterns of module names that are left in floating point.
    chunk_rows : int
        Rows fitted per JAX call; bounds the fitting memory. 512 keeps a
        chunk's DP tables in cache: on SmolLM2 at 4 bits, 2048 rows per call
        fit 25 % slower.
    fit : FitMode
        ``"kmeans"`` (default) or ``"guided"``: after k-means, minimise each
        layer's gradient-weighted output error ``e^T H e`` with error-feedback
        assignment, least-squares tables and coordinate descent. Needs
        calibration data (``H`` comes from the calibration gradients). Same
        packed format and kernels.
    guided_iters : int
        Rounds of least-squares tables + coordinate descent in a guided fit.
        1 by default: on SmolLM2 w3-s0.45 a second round moved perplexity
        from 17.91 to 17.80 but took the 4-bit fits past 60 s on 2 cores.
    guided_damp : float
        Damping of the guided Hessian's diagonal, relative to its mean.
    guided_shrink : float
        Weight, in 0..1, of the guided Hessian's diagonal against the whole
        matrix (:func:`sqc.quant.guided.shrunk`): the off-diagonal terms are
        the part 32 calibration windows estimate worst. 0.5 by default
        (measured on SmolLM2 on the tutorial and the held-out text).
    head : HeadFormat
        ``"int8"`` (default): the output projection (``lm_head``) is stored
        int8 with one scale per row and runs its own kernel (SmolLM2: +0.006 %
        perplexity, a quarter of the fp32 bytes read per token); ``"float"``
        keeps it as it is.
    fuse : bool
        Fuse sibling linears that read the same input (q/k/v, gate/up) into
        one packed layer and one kernel call (default True; results are equal).

    Examples
    --------
    >>> cfg = QuantConfig(bits=3, outlier_pct=0.40, sensitive_pct=0.05)
    >>> QuantConfig.from_json(cfg.to_json()) == cfg
    True
    >>> resolve_config("w4-s0.45").bits
    4
    """

    bits: int = 3
    outlier_pct: float = 0.40
    sensitive_pct: float = 0.05
    table_dtype: TableDType = TableDType.FLOAT16
    kmeans_iters: int = 8
    skip: tuple[str, ...] = ()
    chunk_rows: int = 512
    fit: FitMode = FitMode.KMEANS
    guided_iters: int = 1
    guided_damp: float = 0.01
    guided_shrink: float = 0.5
    head: HeadFormat = HeadFormat.INT8
    fuse: bool = True
    bits_per_weight: float | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(
                f"QuantConfig.bits must be an integer in 2..8, got {self.bits!r}. "
                "Use 3 or 4 for the SqueezeLLM settings."
            )
        for name in ("outlier_pct", "sensitive_pct"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"QuantConfig.{name} must be a number, got {value!r}")
            if not 0.0 <= float(value) <= 10.0 or value != value:
                raise ValueError(
                    f"QuantConfig.{name} is a percentage of each matrix and must lie in [0, 10], "
                    f"got {value!r} (0.40 / 0.05 are the SqueezeLLM values)."
                )
            object.__setattr__(self, name, float(value))
        if not isinstance(self.table_dtype, TableDType):
            try:
                object.__setattr__(self, "table_dtype", TableDType(self.table_dtype))
            except ValueError:
                valid = ", ".join(t.value for t in TableDType)
                raise ValueError(
                    f"QuantConfig.table_dtype {self.table_dtype!r} is not one of: {valid}"
                ) from None
        if not isinstance(self.fit, FitMode):
            try:
                object.__setattr__(self, "fit", FitMode(self.fit))
            except ValueError:
                valid = ", ".join(m.value for m in FitMode)
                raise ValueError(f"QuantConfig.fit {self.fit!r} is not one of: {valid}") from None
        if not isinstance(self.head, HeadFormat):
            try:
                object.__setattr__(self, "head", HeadFormat(self.head))
            except ValueError:
                valid = ", ".join(m.value for m in HeadFormat)
                raise ValueError(f"QuantConfig.head {self.head!r} is not one of: {valid}") from None
        if not isinstance(self.fuse, bool):
            raise ValueError(f"QuantConfig.fuse must be True or False, got {self.fuse!r}")
        if isinstance(self.guided_iters, bool) or not isinstance(self.guided_iters, int) or not 0 <= self.guided_iters <= 100:
            raise ValueError(f"QuantConfig.guided_iters must be an integer in 0..100, got {self.guided_iters!r}")
        if isinstance(self.guided_damp, bool) or not isinstance(self.guided_damp, (int, float)) \
                or not 0.0 < float(self.guided_damp) <= 10.0:
            raise ValueError(
                f"QuantConfig.guided_damp must be a number in (0, 10] (a fraction of the mean Hessian diagonal; "
                f"0.01 is the usual value), got {self.guided_damp!r}"
            )
        object.__setattr__(self, "guided_damp", float(self.guided_damp))
        if isinstance(self.guided_shrink, bool) or not isinstance(self.guided_shrink, (int, float)) \
                or not 0.0 <= float(self.guided_shrink) <= 1.0:
            raise ValueError(f"QuantConfig.guided_shrink must be a number in [0, 1] (0 keeps the guided Hessian "
                             f"as measured, 1 keeps only its diagonal), got {self.guided_shrink!r}")
        object.__setattr__(self, "guided_shrink", float(self.guided_shrink))
        if self.bits_per_weight is not None:
            bpw = self.bits_per_weight
            if isinstance(bpw, bool) or not isinstance(bpw, (int, float)) or not 2.0 <= float(bpw) <= 8.0:
                raise ValueError(f"QuantConfig.bits_per_weight is a budget of stored bits per weight in [2, 8] "
                                 f"(layers get {BUDGET_WIDTHS} bits), got {bpw!r}")
            object.__setattr__(self, "bits_per_weight", float(bpw))
        if not isinstance(self.kmeans_iters, int) or not 1 <= self.kmeans_iters <= 10_000:
            raise ValueError(f"QuantConfig.kmeans_iters must be in 1..10000, got {self.kmeans_iters!r}")
        if not isinstance(self.chunk_rows, int) or self.chunk_rows < 1:
            raise ValueError(f"QuantConfig.chunk_rows must be a positive int, got {self.chunk_rows!r}")
        if isinstance(self.skip, str):
            raise TypeError("QuantConfig.skip is a tuple of patterns, e.g. ('lm_head',), not a string")
        object.__setattr__(self, "skip", tuple(str(s) for s in self.skip))
        if self.version != CONFIG_VERSION:
            raise ValueError(
                f"QuantConfig version {self.version} is not supported by this sqc "
                f"(it reads version {CONFIG_VERSION}); upgrade sqc."
            )

    # -- derived -----------------------------------------------------------------
    @property
    def n_centroids(self) -> int:
        return 1 << self.bits

    @property
    def sparse_pct(self) -> float:
        return self.outlier_pct + self.sensitive_pct

    # -- serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["table_dtype"] = self.table_dtype.value
        d["fit"] = self.fit.value
        d["head"] = self.head.value
        d["skip"] = list(self.skip)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {sorted(unknown)}; known: {sorted(known)}")
        if "version" in d:  # a stored config (to_dict writes every field): one written before a field existed
            d = {**_BEFORE_FIELD, **d}  # was made with that field's old behaviour
        if "skip" in d:
            d["skip"] = tuple(d["skip"])
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "QuantConfig":
        return cls.from_dict(json.loads(s))

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, QuantConfig] = {
    "w4": QuantConfig(bits=4, outlier_pct=0.0, sensitive_pct=0.0),
    "w3": QuantConfig(bits=3, outlier_pct=0.0, sensitive_pct=0.0),
    "w4-s0.45": QuantConfig(bits=4, outlier_pct=0.40, sensitive_pct=0.05),
    "w3-s0.45": QuantConfig(bits=3, outlier_pct=0.40, sensitive_pct=0.05),
}
# size budgets (stored bits per weight, 0.45 % sparse part included): widths 2-4 bits by sensitivity
PRESETS.update({f"b{bpw:g}": QuantConfig(bits_per_weight=bpw, outlier_pct=0.40, sensitive_pct=0.05)
                for bpw in (2.5, 3.0, 3.25, 3.5, 4.0, 4.5)})
PRESETS.update({f"{name}-g": cfg.replace(fit=FitMode.GUIDED) for name, cfg in list(PRESETS.items())})


def resolve_config(config: "QuantConfig | str | Mapping[str, Any] | None") -> QuantConfig:
    """Turn a config, preset name, or dict into a ``QuantConfig``."""
    if config is None:
        return PRESETS["w3-s0.45"]
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        try:
            return PRESETS[config]
        except KeyError:
            raise ValueError(
                f"unknown preset {config!r}; valid presets: {', '.join(PRESETS)}"
            ) from None
    if isinstance(config, Mapping):
        return QuantConfig.from_dict(config)
    raise TypeError(f"config must be a QuantConfig, a preset name or a dict, got {type(config).__name__}")
