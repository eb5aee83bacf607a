"""Problem-agnostic bilevel optimisation in PyTorch.

``x̂(θ) = argmin_x Φ(x; θ)`` (per sample) and ``min_θ ℓ(x̂(θ), θ)``; plug in an
:class:`InnerProblem` and an :class:`OuterLoss`, pick a hypergradient estimator
(:class:`ImplicitCG`, :class:`Unrolled`) and an outer loop (:class:`HOAG`).
"""
from .history import History, Result, tolerance_schedule
from .hoag import HOAG
from .adaptive import AdaptiveInexact
from .maid import MAID
from .hypergrad import ImplicitCG, Unrolled
from .linalg import NonPositiveCurvatureError, batched_cg
from .problem import (Bounds, Hypergradient, HypergradientEstimator, InnerProblem, OuterLoss,
                      TaskOperator)
from .solvers import SolveResult, solve_inner

__all__ = [
    "HOAG", "ImplicitCG", "Unrolled", "InnerProblem", "OuterLoss", "TaskOperator",
    "HypergradientEstimator", "Hypergradient", "Result", "History", "Bounds", "SolveResult",
    "solve_inner", "batched_cg", "tolerance_schedule", "NonPositiveCurvatureError",
]
__all__ += ["MAID", "AdaptiveInexact"]
__version__ = "0.1.0"
