"""Problem-agnostic bilevel optimisation in PyTorch.

``x̂(θ) = argmin_x Φ(x; θ)`` (per sample) and ``min_θ ℓ(x̂(θ), θ)``; plug in an
:class:`InnerProblem` and an :class:`OuterLoss`, pick a hypergradient estimator
(:class:`ImplicitCG`, :class:`Unrolled`, :class:`AdaptiveInexact`) and an outer loop
(:class:`QuasiNewton`, the default; :class:`HOAG`, :class:`MAID`; :class:`MinibatchBilevel` for
data sets streamed in minibatches).
"""
from .history import History, Result, tolerance_schedule
from .hoag import HOAG
from .adaptive import AdaptiveInexact
from .maid import MAID
from .quasi_newton import QuasiNewton
from .hypergrad import ImplicitCG, Unrolled
from .minibatch import MinibatchBilevel
from .implicit import implicit_vjp
from .linalg import NonPositiveCurvatureError, batched_cg
from .problem import (Bounds, ErrorBound, Hypergradient, HypergradientEstimator, InnerProblem,
                      OuterLoss, TaskOperator)
from .solvers import SolveResult, solve_inner

__all__ = [
    "QuasiNewton", "HOAG", "MAID", "MinibatchBilevel", "ImplicitCG", "Unrolled",
    "AdaptiveInexact", "InnerProblem", "OuterLoss", "HypergradientEstimator", "TaskOperator",
    "Hypergradient", "ErrorBound", "Result", "History", "Bounds",
    "SolveResult", "solve_inner", "batched_cg", "implicit_vjp", "tolerance_schedule",
    "NonPositiveCurvatureError",
]
__version__ = "0.3.0"
