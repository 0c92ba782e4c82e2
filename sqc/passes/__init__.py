"""The compile passes, one per file."""
from .annotate_sensitivity import AnnotateSensitivity
from .base import CompileContext, Pass, PassManager, PassResult
from .fit_codebook import FitCodebook
from .lower import Lower
from .pack_layout import PackLayout
from .split_outliers import SplitOutliers

__all__ = [
    "AnnotateSensitivity",
    "SplitOutliers",
    "FitCodebook",
    "PackLayout",
    "Lower",
    "Pass",
    "PassManager",
    "PassResult",
    "CompileContext",
]
