"""Abstract interfaces of a bilevel problem.

The bilevel problem is

.. math::

    \\min_\\theta \\; \\ell(\\theta) = \\ell(\\hat x(\\theta), \\theta; \\text{batch}),\\qquad
    \\hat x_b(\\theta) = \\arg\\min_{x_b} \\Phi_b(x_b; \\theta) \\quad (b = 1..B).

* ``θ`` is a dict of named tensors (``{"log_weight": t, ...}``); :class:`Bounds` live beside it.
* The inner objective is *per sample*: :meth:`InnerProblem.objective` returns shape ``(B,)`` and
  sample ``b`` depends on ``x[b]`` only, so the Hessian ``∇²ₓₓΣ_bΦ_b`` is block diagonal and
  solvers / CG stop per sample.
* The outer loss returns a scalar (usually a mean over the batch) and may own trainable
  parameters (an ``nn.Module``), e.g. the layers of a task network that are fine-tuned.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

Theta = Dict[str, Tensor]

__all__ = [
    "Theta",
    "Bounds",
    "InnerProblem",
    "OuterLoss",
    "TaskOperator",
    "HypergradientEstimator",
    "Hypergradient",
    "ErrorBound",
    "check_theta",
    "check_tolerance",
    "check_finite",
    "project",
    "theta_norm",
    "theta_floats",
    "theta_axpy",
    "theta_sub",
    "theta_dot",
    "theta_distance",
    "validate_inner",
]


# ---------------------------------------------------------------------------------------------
# validation helpers (errors name the argument and the value seen)
# ---------------------------------------------------------------------------------------------
def check_tolerance(name: str, value: float, allow_zero: bool = False) -> float:
    """Return ``float(value)`` or raise ``ValueError`` if it is negative / non-finite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return v


def check_finite(name: str, t: Tensor) -> Tensor:
    """Raise ``ValueError`` naming ``name`` if ``t`` holds NaN or ±inf."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} holds {bad} non-finite value(s) (NaN or inf), shape {tuple(t.shape)}")
    return t


def check_theta(theta: Mapping[str, Tensor], expected: Optional[Tuple[str, ...]] = None) -> Theta:
    """Validate a hyperparameter dict: tensor values, finite, known names.

    Raises ``TypeError`` for a non-dict / non-tensor value and ``ValueError`` for unknown or
    missing names and non-finite values.
    """
    if not isinstance(theta, Mapping):
        raise TypeError(f"theta must be a dict of named tensors, got {type(theta).__name__}")
    if expected is not None:
        unknown = sorted(set(theta) - set(expected))
        missing = sorted(set(expected) - set(theta))
        if unknown:
            raise ValueError(f"theta has unknown name(s) {unknown}; expected {sorted(expected)}")
        if missing:
            raise ValueError(f"theta is missing name(s) {missing}; expected {sorted(expected)}")
    for k, v in theta.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"theta[{k!r}] must be a torch.Tensor, got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"theta[{k!r}] must be a floating-point tensor (hyperparameters are "
                            f"differentiated), got dtype {v.dtype}; e.g. torch.tensor(0.0, "
                            f"dtype=torch.float64)")
        check_finite(f"theta[{k!r}]", v)
    return dict(theta)


def theta_norm(d: Mapping[str, Tensor]) -> float:
    """Euclidean norm ``sqrt(Σ_k ‖d[k]‖²)`` of a dict of tensors (θ or a hypergradient), in float64."""
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in d.values()))


def theta_floats(theta: Mapping[str, Tensor]) -> Dict[str, Any]:
    """θ as plain Python numbers (scalars) or nested lists, for History records and JSON."""
    return {k: (float(v) if v.numel() == 1 else v.detach().cpu().tolist()) for k, v in theta.items()}


def theta_axpy(a: float, d: Mapping[str, Tensor], theta: Mapping[str, Tensor]) -> Theta:
    """``θ + a·d`` per name (detached)."""
    return {k: (theta[k] + a * d[k]).detach() for k in theta}


def theta_sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Theta:
    """``a − b`` per name (detached)."""
    return {k: (a[k] - b[k]).detach() for k in a}


def theta_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """``⟨a, b⟩ = Σ_k ⟨a[k], b[k]⟩`` in float64."""
    return sum(float((a[k].double() * b[k].double()).sum()) for k in a)


def theta_distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """``‖a − b‖`` over all names (float64)."""
    return theta_norm(theta_sub(a, b))


def gradient_mapping_norm(theta: Mapping[str, Tensor], grad: Mapping[str, Tensor],
                          bounds: Optional["Bounds"], step: float = 1.0) -> float:
    """``‖G_t(g)‖ = ‖θ − Π(θ − t·g)‖/t`` in float64 (``‖g‖`` without bounds), ``t = step > 0``.

    Computed entry by entry as ``G_t(g)_i = clamp(g_i, (θ_i − u_i)/t, (θ_i − l_i)/t)``, which
    equals the formula without forming ``θ − t·g``: that difference rounds back to ``θ`` when
    ``t·|g_i|`` is below half a unit in the last place of ``θ_i`` (a small step, or a small
    gradient of a float32 θ), and the norm would read 0 at a point that is not stationary.
    """
    if bounds is None:
        return theta_norm(grad)
    total = 0.0
    for k, g in grad.items():
        g64, th = g.detach().double(), theta[k].detach().double()
        lo, hi = bounds.lower.get(k), bounds.upper.get(k)
        low = None if hi is None else (th - hi) / step
        high = None if lo is None else (th - lo) / step
        if low is not None or high is not None:
            g64 = torch.clamp(g64, min=low, max=high)
        total += float((g64 ** 2).sum())
    return math.sqrt(total)


@dataclass
class Bounds:
    """Box constraints ``lower[k] ≤ θ[k] ≤ upper[k]`` for the named hyperparameters.

    Names that are absent are unbounded. Projection is the elementwise clamp.
    """

    lower: Dict[str, float] = field(default_factory=dict)
    upper: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        for side, values in (("lower", self.lower), ("upper", self.upper)):
            if not isinstance(values, Mapping):
                raise TypeError(f"Bounds.{side} must be a dict name -> float, got {type(values).__name__}")
            for k, v in values.items():
                if isinstance(v, (str, bytes, bool)):
                    raise TypeError(f"Bounds.{side}[{k!r}] must be a real number, got {v!r}")
                try:
                    fv = float(v)
                except (TypeError, ValueError):
                    raise TypeError(f"Bounds.{side}[{k!r}] must be a real number, got {v!r}") from None
                if math.isnan(fv):
                    raise ValueError(f"Bounds.{side}[{k!r}] is NaN")
        for k in set(self.lower) & set(self.upper):
            if self.lower[k] > self.upper[k]:
                raise ValueError(
                    f"Bounds for {k!r}: lower={self.lower[k]} exceeds upper={self.upper[k]}")

    def check_names(self, theta: Mapping[str, Tensor]) -> None:
        unknown = sorted((set(self.lower) | set(self.upper)) - set(theta))
        if unknown:
            raise ValueError(f"bounds name(s) {unknown} not in theta {sorted(theta)}")


def project(theta: Mapping[str, Tensor], bounds: Optional[Bounds]) -> Theta:
    """Euclidean projection of ``theta`` onto the box ``bounds`` (identity when ``None``)."""
    if bounds is None:
        return {k: v.detach().clone() for k, v in theta.items()}
    out = {}
    for k, v in theta.items():
        lo = bounds.lower.get(k)
        hi = bounds.upper.get(k)
        out[k] = v.detach().clamp(min=lo, max=hi) if (lo is not None or hi is not None) else v.detach().clone()
    return out


# ---------------------------------------------------------------------------------------------
# inner problem
# ---------------------------------------------------------------------------------------------
class InnerProblem(ABC):
    """Lower-level problem ``x̂_b(θ) = argmin_x Φ_b(x; θ)``, one independent problem per sample.

    Subclasses implement :meth:`objective` and :meth:`init`. They may also supply

    * :attr:`strong_convexity` -- a constant ``μ > 0`` with ``∇²ₓₓΦ_b ⪰ μ I`` (used by MAID's
      error bounds), ``None`` when unknown;
    * :meth:`grad` -- ``∇ₓΦ`` in closed form;
    * :meth:`hvp` and :meth:`mixed_vjp` -- closed-form Hessian-vector and mixed products;
    * :meth:`solve` -- an own inner solver.

    The defaults use autograd. ``batch`` is whatever the problem needs (usually a dict of tensors
    such as ``{"y": noisy}``); solvers pass it through untouched.
    """

    #: names of the hyperparameters the problem expects in θ (``None``: not checked)
    theta_names: Optional[Tuple[str, ...]] = None
    #: strong-convexity constant μ of every Φ_b in x (``None`` if unknown)
    strong_convexity: Optional[float] = None

    @abstractmethod
    def objective(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:
        """Per-sample objective ``Φ_b(x_b; θ)``, a tensor of shape ``(B,)``."""

    @abstractmethod
    def init(self, theta: Theta, batch: Any) -> Tensor:
        """Initial point ``x⁰`` (shape ``(B, ...)``) for the inner solver."""

    def lipschitz(self, theta: Theta, batch: Any) -> Optional[float]:
        """A constant ``L`` with ``‖∇ₓΦ_b(x) − ∇ₓΦ_b(x')‖ ≤ L‖x − x'‖`` (gradient-step size
        ``1/L`` for :class:`~bilevel.Unrolled`); ``None`` (default) when unknown."""
        return None

    def strong_convexity_constant(self, theta: Theta, batch: Any) -> Optional[float]:
        """``μ`` with ``∇²ₓₓΦ_b ⪰ μI`` for the given θ and batch (default :attr:`strong_convexity`)."""
        return self.strong_convexity

    # ----- derivatives (autograd defaults) -----------------------------------------------------
    def grad(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:
        """``∇ₓ Σ_b Φ_b(x_b; θ)`` (equal to the per-sample gradients stacked). No graph kept."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            th = {k: v.detach() for k, v in theta.items()}
            (g,) = torch.autograd.grad(self.objective(xg, th, batch).sum(), xg)
        return g

    def hvp(self, x: Tensor, theta: Theta, batch: Any, v: Tensor) -> Optional[Tensor]:
        """Closed-form ``∇²ₓₓΦ · v`` (per sample). Return ``None`` to use autograd."""
        return None

    def mixed_vjp(self, x: Tensor, theta: Theta, batch: Any, q: Tensor) -> Optional[Theta]:
        """Closed-form ``(∇²_{xθ} Σ_bΦ_b)ᵀ q = ∇_θ ⟨∇ₓΣ_bΦ_b, q⟩``. ``None`` to use autograd."""
        return None

    def linearize(self, x: Tensor, theta: Theta, batch: Any):
        """Optional: ``(hvp_fn, mixed_fn)`` closures with the quantities that depend only on
        ``(x, θ)`` computed once, for many products at the same point (CG). ``None`` (default)
        makes :class:`~bilevel.linalg.HessianOperator` call :meth:`hvp` / :meth:`mixed_vjp`."""
        return None

    def has_closed_form_products(self) -> bool:
        """True when the subclass overrides both :meth:`hvp` and :meth:`mixed_vjp`."""
        cls = type(self)
        return cls.hvp is not InnerProblem.hvp and cls.mixed_vjp is not InnerProblem.mixed_vjp

    def solve(self, theta: Theta, batch: Any, tol: float, x0: Optional[Tensor] = None,
              max_iter: int = 100):
        """Own inner solver. Return a :class:`bilevel.solvers.SolveResult` or ``None`` to let the
        caller use a generic solver from :mod:`bilevel.solvers`."""
        return None

    def check(self, x: Tensor, theta: Theta, batch: Any) -> None:
        """Validate inputs; raise ``ValueError`` naming the argument. Subclasses extend this."""
        check_theta(theta, self.theta_names)
        check_finite("x", x)


def validate_inner(inner: "InnerProblem", theta: Theta, batch: Any, x: Tensor) -> Tensor:
    """Check once, before any work, that ``inner`` behaves as the interface says at ``(x, θ)``.

    ``x`` must have a batch dimension with at least one sample; ``Φ(x; θ)`` must have shape
    ``(B,)``, be finite and be differentiable in ``x``. Raises ``ValueError``/``TypeError``
    naming what is wrong. Returns ``Φ(x; θ)`` (detached).
    """
    name = type(inner).__name__
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"x must have a batch dimension (shape (B, ...)), got a 0-d tensor; "
                         f"{name}.init or x0 must return x[None] for a single sample")
    if x.shape[0] == 0:
        raise ValueError(f"the batch is empty: x has shape {tuple(x.shape)} (B = 0)")
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        phi = inner.objective(xg, {k: v.detach() for k, v in theta.items()}, batch)
        if not isinstance(phi, Tensor):
            raise TypeError(f"{name}.objective must return a tensor of shape (B,) = "
                            f"({x.shape[0]},), got {type(phi).__name__}")
        if tuple(phi.shape) != (x.shape[0],):
            raise ValueError(f"{name}.objective must return one value per sample, shape (B,) = "
                             f"({x.shape[0]},); got shape {tuple(phi.shape)}")
        if not bool(torch.isfinite(phi).all()):
            raise ValueError(f"{name}.objective is not finite at the initial point for theta = "
                             f"{theta_floats(theta)}: {phi.detach().tolist()[:4]}")
        if not phi.requires_grad:
            raise ValueError(f"{name}.objective is not differentiable in x (its output does not "
                             f"depend on x through autograd: detached, or computed in numpy?)")
    return phi.detach()


# ---------------------------------------------------------------------------------------------
# outer loss
# ---------------------------------------------------------------------------------------------
class OuterLoss(nn.Module, ABC):
    """Upper-level loss ``ℓ(x, θ, batch)``, returning a scalar.

    An ``OuterLoss`` is an ``nn.Module``: any trainable parameter it holds (for example the
    fine-tuned layers of a task network) receives its gradient ``∇_φ ℓ`` with the
    hypergradient. The inner solution does not depend on those parameters, so that gradient is
    the plain partial derivative.
    """

    @abstractmethod
    def forward(self, x: Tensor, theta: Theta, batch: Any) -> Tensor:  # pragma: no cover
        ...

    def trainable_parameters(self) -> Dict[str, nn.Parameter]:
        """Named parameters with ``requires_grad`` (those an outer optimizer updates)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# task operator
# ---------------------------------------------------------------------------------------------
class TaskOperator(nn.Module, ABC):
    """Task operator ``T_φ``: the map from a reconstruction ``x`` to a task output ``T_φ(x)``.

    In task-adapted bilevel learning the upper loss scores the task output, not ``x`` itself::

        ℓ(θ, φ_t) = L(T_φ(x̂(θ)), s),        φ = (φ_t, φ_f),

    with labels ``s`` (a segmentation, a class). The parameters split into a declared trainable
    part ``φ_t`` and a frozen rest ``φ_f``. The inner solution does not depend on ``φ``, so
    ``∇_{φ_t} ℓ = ∂L/∂φ_t`` is a plain backward pass, while the hypergradient
    ``∇_θ ℓ = (∂x̂/∂θ)ᵀ J_T(x̂)ᵀ ∇L`` passes through ``T`` by the chain rule
    (``J_T`` the Jacobian of ``T_φ`` in ``x``, ``∇L`` the gradient of ``L`` in the task output).

    The contract:

    * :meth:`forward` computes ``T_φ(x)``, differentiable in ``x``;
    * :meth:`finetunes` declares ``φ_t``: for a dotted parameter or submodule name of
      :meth:`task_network` it answers whether that belongs to the trainable part (both ``"head"``
      and ``"head.weight"`` for a trainable block ``head``, say);
    * :meth:`freeze` sets ``requires_grad`` from that declaration (subclasses call it at the end
      of ``__init__``);
    * :meth:`train` puts only trainable submodules in training mode: frozen ones always stay in
      eval mode (batch-norm uses its running statistics and never overwrites them, dropout is
      off), whatever mode is asked for.

    Nothing here is about images: ``x`` is any tensor the task network accepts. Concrete
    operators live with the applications (for imaging networks, ``recon.tasks.TaskOperator``
    picks the trainable blocks by name prefix or as the last ``K`` blocks).

    Examples:
        A classifier whose ``head`` is fine-tuned while its feature extractor (batch-norm
        included) stays frozen:

        >>> import torch
        >>> from torch import nn
        >>> from bilevel import TaskOperator
        >>> class Classifier(TaskOperator):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        ...                                       nn.AdaptiveAvgPool2d(1), nn.Flatten())
        ...         self.head = nn.Linear(4, 10)
        ...         self.freeze()
        ...     def finetunes(self, name):
        ...         return name == "head" or name.startswith("head.")
        ...     def forward(self, x):
        ...         return self.head(self.features(x))
        >>> T = Classifier().train()
        >>> T.trainable_names
        ['head.weight', 'head.bias']
        >>> T.head.training, T.features[1].training    # the frozen batch-norm stays in eval mode
        (True, False)
        >>> T(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover
        """The task output ``T_φ(x)``."""

    @abstractmethod
    def finetunes(self, name: str) -> bool:  # pragma: no cover
        """Whether the parameter or submodule ``name`` (dotted, as in
        ``task_network().named_parameters()`` / ``named_modules()``) is in the trainable ``φ_t``."""

    def task_network(self) -> nn.Module:
        """The module whose parameter and submodule names :meth:`finetunes` receives: ``self`` by
        default; an operator that wraps a network returns the network."""
        return self

    def freeze(self) -> "TaskOperator":
        """Apply the declaration: ``requires_grad = finetunes(name)`` for every parameter, and the
        module modes of :meth:`train` for the current mode. Returns ``self``."""
        for name, p in self.task_network().named_parameters():
            p.requires_grad_(bool(self.finetunes(name)))
        return self.train(self.training)

    def train(self, mode: bool = True) -> "TaskOperator":
        """Trainable submodules follow ``mode``; frozen ones (and the network's own root) stay in
        eval mode."""
        self.training = bool(mode)
        for name, m in self.task_network().named_modules():
            if m is not self:
                m.training = bool(mode) and bool(name) and bool(self.finetunes(name))
        return self

    @property
    def trainable_names(self) -> List[str]:
        """Names of the trainable parameters ``φ_t`` (``requires_grad=True``)."""
        return [n for n, p in self.task_network().named_parameters() if p.requires_grad]

    @property
    def frozen_names(self) -> List[str]:
        """Names of the frozen parameters ``φ_f``."""
        return [n for n, p in self.task_network().named_parameters() if not p.requires_grad]

    def finetuned_parameters(self) -> Dict[str, nn.Parameter]:
        """``{name: parameter}`` of ``φ_t`` (what an outer ``param_optimizer`` steps)."""
        return {n: p for n, p in self.task_network().named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# hypergradient estimator
# ---------------------------------------------------------------------------------------------
@dataclass
class ErrorBound:
    """A-posteriori accuracy of one hypergradient ``z`` (filled by :class:`~bilevel.AdaptiveInexact`).

    ``loss`` ``a ≥ |ℓ(x̃) − ℓ(x̂)|`` (dual-weighted residual); ``grad`` ``ω ≥ ‖z − ∇ℓ(θ)‖``
    (``None`` until computed); ``terms`` the summands of ``ω`` by name; ``mu`` the strong-convexity
    constant used; ``x_error`` ``ē = ‖(r_b/μ)_b‖``; ``inner_residual`` ``r_b = ‖∇ₓΦ_b(x̃_b)‖`` and
    ``cg_residual`` ``ρ_b`` per sample; ``outer_x_grad_norm`` ``‖(∇ₓℓ)_b‖``; ``mixed_norm``
    ``‖∇²_{xθ}Φ‖``; ``lipschitz`` the constants used; ``products`` gradient / Hessian / mixed
    products spent on the bound (already counted in ``Hypergradient.cg_iterations``).
    """

    loss: float
    mu: float
    x_error: float
    inner_residual: Tensor
    cg_residual: Tensor
    outer_x_grad_norm: Tensor
    products: int = 0
    hessian_closed: bool = False
    grad: Optional[float] = None
    terms: Dict[str, float] = field(default_factory=dict)
    mixed_norm: Optional[float] = None
    lipschitz: Dict[str, float] = field(default_factory=dict)
    #: what :meth:`AdaptiveInexact.complete` needs to finish ``ω`` at the same point (private)
    pending: Any = field(default=None, repr=False)


@dataclass
class Hypergradient:
    """One hypergradient and what it cost.

    Attributes
    ----------
    loss: upper loss ``ℓ(x, θ)`` at the point used (float).
    theta_grad: ``∇ℓ(θ)`` per name.
    param_grads: ``∇_φ ℓ`` for the trainable parameters of the outer loss (by name).
    cg_iterations: CG iterations (max over samples) -- 0 for estimators without CG.
    cg_converged: whether every sample's CG met its tolerance.
    extra_inner_steps: differentiable inner steps taken by the estimator (``Unrolled``).
    error_bound: an a-posteriori bound on ``‖g − ∇ℓ(θ)‖`` when the estimator supplies one.
    bound: the full :class:`ErrorBound` record (``None`` for estimators without bounds).
    adjoint: the adjoint ``q ≈ (∇²ₓₓΦ)⁻¹∇ₓℓ`` of implicit estimators (``None`` otherwise); with the
        inner residual ``r = ∇ₓΦ(x̃)``, ``ℓ(x̃) − ⟨q, r⟩`` is a second-order accurate value of
        ``ℓ(x̂)`` (the dual-weighted correction the outer loops use).
    """

    loss: float
    theta_grad: Theta
    param_grads: Dict[str, Tensor] = field(default_factory=dict)
    cg_iterations: int = 0
    cg_converged: bool = True
    extra_inner_steps: int = 0
    error_bound: Optional[float] = None
    info: Dict[str, Any] = field(default_factory=dict)
    bound: Optional[ErrorBound] = None
    adjoint: Optional[Tensor] = None

    def norm(self) -> float:
        """Euclidean norm of the θ-part of the hypergradient."""
        return theta_norm(self.theta_grad)


class HypergradientEstimator(ABC):
    """Map ``(inner, outer, θ, batch, x) ↦`` :class:`Hypergradient`.

    ``x`` is the approximate inner solution the outer loop has; ``tol`` is the accuracy the
    estimator should reach in its own linear solves. Estimators may keep state between calls
    (e.g. CG's warm start) in ``self``; :meth:`reset` clears it.
    """

    @abstractmethod
    def __call__(self, inner: InnerProblem, outer: OuterLoss, theta: Theta, batch: Any,
                 x: Tensor, tol: float, relative: bool = False) -> Hypergradient:  # pragma: no cover
        """``tol``: accuracy of the estimator's linear solves, absolute per sample, or relative
        to ``‖(∇ₓℓ)_b‖`` when ``relative`` (what the outer loops pass)."""
        ...

    def _warm(self, like: Tensor) -> Optional[Tensor]:
        """The stored warm start ``q`` when warm starts are on, it matches ``like`` and it is
        finite (a solve that overflowed at a rejected trial point must not poison the next)."""
        q = getattr(self, "_q", None)
        if (getattr(self, "warm_start", False) and q is not None and q.shape == like.shape
                and q.dtype == like.dtype and q.device == like.device
                and bool(torch.isfinite(q).all())):
            return q
        return None

    def warm_state(self) -> Dict[str, Any]:
        """Warm-start state worth checkpointing (CG's last ``q`` for the CG estimators)."""
        return {"q": getattr(self, "_q", None)}

    def load_warm_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`warm_state` returned (used when a run resumes)."""
        if hasattr(self, "_q") and "q" in state:
            self._q = state["q"]

    def reset(self) -> None:
        """Forget warm-start state."""
