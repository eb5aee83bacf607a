"""Bilevel benchmark problems with known (or carefully computed) optima, for comparing outer loops.

Every builder returns ``(inner, outer, theta0, batch, bounds, info)``; ``info`` holds at least
``name``, ``best_loss`` (the best known upper loss), ``best_theta``, ``reference`` (how the best
loss was found), ``mu_available`` and ``loss_at`` (``θ ↦ ℓ(x̂(θ), θ)`` at a tight inner solve).

* :func:`per_feature_ridge` -- ridge regression with one penalty per feature, ``λ_j = e^{θ_j}``:

  .. math::

      \\hat w(\\theta) = \\arg\\min_w\\ \\mathrm{agg}_i (x_i^\\top w - y_i)^2 + \\sum_j e^{\\theta_j} w_j^2,
      \\qquad \\ell = \\mathrm{agg}_i (x_{v,i}^\\top \\hat w - y_{v,i})^2

  (``agg`` the mean or the sum; data ``X, y`` multiplied by a scale ``s``). ``ŵ = (G + Λ)⁻¹r``
  with ``G = XᵀX/n'``, ``r = Xᵀy/n'`` (``n' = n`` for means, 1 for sums); the inner problem is
  solved exactly by a linear solve; the optimum comes from a multi-start L-BFGS-B on this
  closed form (exact gradients by autograd through the solve).
* :func:`benchopt_quadratic` -- the generated quadratic problem of benchopt's bilevel benchmark
  (its ``simulated`` data set: 1024 samples, inner and outer dimension 5, spectra in
  ``[μ, L] = [0.1, 1]``), rewritten: with per-sample means ``H, C, b`` (inner) and
  ``H_o, K_o, C_o, b_o`` (outer)

  .. math::

      \\Phi(z; \\theta) = \\tfrac12 z^\\top H z + \\theta^\\top C z + b^\\top z,\\qquad
      \\ell(z, \\theta) = \\tfrac12 z^\\top H_o z + \\tfrac12 \\theta^\\top K_o\\theta
      + \\theta^\\top C_o z + b_o^\\top z .

  ``ẑ(θ) = Jθ + z₀`` (``J = −H⁻¹Cᵀ``, ``z₀ = −H⁻¹b``), so ``ℓ(θ) = ½θᵀPθ + pᵀθ + c`` with
  ``P = JᵀH_oJ + K_o + C_oJ + JᵀC_oᵀ``; data are redrawn until ``P ≻ 0`` and the optimum
  ``θ* = −P⁻¹p`` is exact.
* :func:`data_cleaning` -- data cleaning on scikit-learn's digits: ``n_train`` training samples,
  a fraction of their labels replaced by a different random label, one weight
  ``w_i = σ(θ_i)`` per training sample; inner: weighted multinomial logistic regression

  .. math::

      \\hat W(\\theta) = \\arg\\min_W\\ \\frac1n\\sum_i \\sigma(\\theta_i)\\,\\mathrm{CE}(W^\\top a_i, c_i)
      + \\rho\\|W\\|^2 ,\\qquad \\ell = \\frac1{n_v}\\sum_j \\mathrm{CE}(\\hat W^\\top a_{v,j}, c_{v,j}),

  on the clean validation samples; the best loss is that of a long L-BFGS-B run on exact
  hypergradients (:func:`exact_lbfgsb`).

:func:`exact_lbfgsb` is scipy's L-BFGS-B driven by ``solve_inner`` and ``ImplicitCG`` at a tight
absolute tolerance, its cost counted like the outer loops' ``cost`` (inner + CG iterations).
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bilevel import Bounds, ImplicitCG, InnerProblem, OuterLoss, SolveResult, solve_inner  # noqa: E402
from bilevel.linalg import batch_norm  # noqa: E402

DTYPE = torch.float64

__all__ = ["PerFeatureRidgeInner", "PerFeatureRidgeOuter", "QuadraticInner", "QuadraticOuter",
           "WeightedLogRegInner", "ValidationCrossEntropy", "per_feature_ridge",
           "benchopt_quadratic", "data_cleaning", "exact_lbfgsb", "FlatTheta"]


# ---------------------------------------------------------------------------------------------
# θ-dicts as flat float64 vectors (for scipy)
# ---------------------------------------------------------------------------------------------
class FlatTheta:
    """θ-dicts ↔ one float64 numpy vector (names sorted), and bounds as scipy pairs."""

    def __init__(self, theta: Dict[str, Tensor]):
        self.names = sorted(theta)
        self.like = {n: theta[n] for n in self.names}

    def vec(self, theta: Dict[str, Tensor]) -> np.ndarray:
        return np.concatenate([theta[n].detach().double().cpu().reshape(-1).numpy()
                               for n in self.names])

    def theta(self, v: np.ndarray) -> Dict[str, Tensor]:
        out, i = {}, 0
        for n in self.names:
            t = self.like[n]
            out[n] = torch.as_tensor(v[i:i + t.numel()]).reshape(t.shape).to(t.dtype)
            i += t.numel()
        return out

    def scipy_bounds(self, bounds: Optional[Bounds]):
        """A list of ``(lo, hi)`` per element (``None`` for a free side), or ``None``."""
        if bounds is None:
            return None
        pairs = []
        for n in self.names:
            lo, hi = bounds.lower.get(n), bounds.upper.get(n)
            pairs += [(lo, hi)] * self.like[n].numel()
        return pairs


# ---------------------------------------------------------------------------------------------
# exact hypergradients + scipy L-BFGS-B (the anchor, and the data-cleaning reference)
# ---------------------------------------------------------------------------------------------
def exact_lbfgsb(inner: InnerProblem, outer: OuterLoss, theta0: Dict[str, Tensor], batch: Any,
                 bounds: Optional[Bounds] = None, tol: float = 1e-10, maxiter: int = 15000,
                 cg_max_iter: int = 1000, inner_method: str = "newton-cg",
                 inner_max_iter: Optional[int] = 200, options: Optional[dict] = None) -> Dict[str, Any]:
    """``scipy.optimize.minimize(method="L-BFGS-B")`` on ``ℓ(θ) = ℓ(x̂(θ), θ)`` with
    ``x̂`` from :func:`bilevel.solve_inner` at ``tol`` (absolute, warm-started) and ``∇ℓ`` from
    :class:`bilevel.ImplicitCG` at ``tol`` (absolute residual, warm-started).

    The cost of an evaluation is ``SolveResult.max_iterations + cg_iterations`` (what the outer
    loops add to their ``cost``). Returns ``theta``, ``loss``, ``nit``, ``nfev``, ``cost``,
    ``seconds``, ``success``, ``message`` and ``history`` (one record per evaluation:
    ``upper_loss``, ``cost``, ``elapsed``, ``theta`` as a list); a non-finite evaluation is
    reported to scipy as ``+inf`` (L-BFGS-B then shrinks its step).
    """
    from scipy.optimize import minimize

    flat = FlatTheta(theta0)
    est = ImplicitCG(max_iter=cg_max_iter)
    state = {"x": None, "cost": 0, "history": [], "t0": time.perf_counter(), "nonfinite": 0}

    def fun(v):
        theta = flat.theta(v)
        try:
            sol = solve_inner(inner, theta, batch, tol, x0=state["x"], method=inner_method,
                              max_iter=inner_max_iter)
            state["cost"] += sol.max_iterations
            if not bool(torch.isfinite(sol.x).all()):
                raise FloatingPointError("non-finite inner solution")
            hg = est(inner, outer, theta, batch, sol.x, tol)
            state["cost"] += hg.cg_iterations
            loss, grad = hg.loss, flat.vec(hg.theta_grad)
            if not (math.isfinite(loss) and np.all(np.isfinite(grad))):
                raise FloatingPointError("non-finite loss or hypergradient")
            state["x"] = sol.x
        except (FloatingPointError, ValueError, RuntimeError):
            state["nonfinite"] += 1
            loss, grad = math.inf, np.zeros_like(v)
        state["history"].append(dict(upper_loss=loss, cost=state["cost"],
                                     elapsed=time.perf_counter() - state["t0"],
                                     theta={k: t.tolist() for k, t in theta.items()}))
        return loss, grad

    opts = dict(maxiter=maxiter, maxfun=4 * maxiter)
    opts.update(options or {})
    res = minimize(fun, flat.vec(theta0), jac=True, method="L-BFGS-B",
                   bounds=flat.scipy_bounds(bounds), options=opts)
    finite = [r["upper_loss"] for r in state["history"] if math.isfinite(r["upper_loss"])]
    return dict(theta=flat.theta(res.x), loss=float(res.fun), nit=int(res.nit),
                nfev=int(res.nfev), cost=state["cost"],
                seconds=time.perf_counter() - state["t0"], success=bool(res.success),
                message=str(res.message), history=state["history"],
                nonfinite_evaluations=state["nonfinite"],
                best_seen=min(finite) if finite else math.inf)


def closed_form_optimum(loss: Callable[[Tensor], Tensor], starts: Sequence[np.ndarray],
                        box: Optional[List[tuple]] = None, maxiter: int = 5000) -> Dict[str, Any]:
    """Multi-start L-BFGS-B on a closed-form ``θ ↦ ℓ(θ)`` (a torch function of a float64 vector;
    exact gradients by autograd), tight tolerances. Returns the best ``theta`` (numpy), ``loss``
    and all the starts' final losses."""
    from scipy.optimize import minimize

    def fun(v):
        t = torch.tensor(v, dtype=DTYPE, requires_grad=True)
        val = loss(t)
        (g,) = torch.autograd.grad(val, t)
        return float(val.detach()), g.numpy().copy()

    finals, best = [], None
    for s in starts:
        r = minimize(fun, np.asarray(s, dtype=np.float64), jac=True, method="L-BFGS-B", bounds=box,
                     options=dict(maxiter=maxiter, maxfun=2 * maxiter, ftol=1e-14, gtol=1e-10,
                                  maxcor=30))
        finals.append(float(r.fun))
        if best is None or r.fun < best.fun:
            best = r
    return dict(theta=best.x, loss=float(best.fun), start_losses=finals)


# ---------------------------------------------------------------------------------------------
# (a) per-feature ridge
# ---------------------------------------------------------------------------------------------
def _agg_div(convention: str, n: int) -> float:
    if convention not in ("mean", "sum"):
        raise ValueError(f"convention must be 'mean' or 'sum', got {convention!r}")
    return float(n) if convention == "mean" else 1.0


class PerFeatureRidgeInner(InnerProblem):
    """``Φ(w; θ) = agg_i (x_iᵀw − y_i)² + Σ_j e^{θ_j} w_j²`` (one problem: ``w`` is ``(1, d)``);
    ``θ = {"log_lam": (d,)}``. Solved exactly: ``ŵ = (G + diag λ)⁻¹ r``, ``G = XᵀX/n'``,
    ``r = Xᵀy/n'`` (``n' = n`` for means, 1 for sums), plus one step of iterative refinement.
    Closed-form products: ``∇²Φ v = 2(G + Λ)v``, ``(∇²_{wθ}Φ)ᵀq = 2λ ⊙ w ⊙ q``; strong
    convexity ``μ = 2(λ_min(G) + min_j λ_j)``."""

    theta_names = ("log_lam",)

    def __init__(self, convention: str = "mean"):
        _agg_div(convention, 1)
        self.convention = convention

    def _gram(self, batch):
        X, y = batch["X"], batch["y"]
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] is not X or cache[1] is not y:
            div = _agg_div(self.convention, X.shape[0])
            self._cache = cache = (X, y, X.T @ X / div, X.T @ y / div)
        return cache[2], cache[3]

    def objective(self, x, theta, batch):
        resid = x @ batch["X"].T - batch["y"]
        agg = resid.pow(2).mean(-1) if self.convention == "mean" else resid.pow(2).sum(-1)
        return agg + (torch.exp(theta["log_lam"]) * x ** 2).sum(-1)

    def init(self, theta, batch):
        return torch.zeros(1, batch["X"].shape[1], dtype=batch["X"].dtype)

    def closed_form(self, log_lam: Tensor, batch) -> Tensor:
        """``ŵ(θ)`` (differentiable in ``log_lam``), shape ``(1, d)``."""
        G, r = self._gram(batch)
        A = G + torch.diag(torch.exp(log_lam))
        w = torch.linalg.solve(A, r)
        w = w + torch.linalg.solve(A, r - A @ w)  # one refinement step
        return w[None]

    def solve(self, theta, batch, tol, x0=None, max_iter=100):
        """Exact solve; counted as one iteration. ``converged`` is honest: ``‖∇Φ‖ ≤ tol``."""
        with torch.no_grad():
            x = self.closed_form(theta["log_lam"].detach(), batch)
            gn = batch_norm(self.grad(x, theta, batch))
        return SolveResult(x=x, iterations=torch.ones(1, dtype=torch.long), grad_norm=gn,
                           converged=gn <= tol, method="direct")

    def grad(self, x, theta, batch):
        G, r = self._gram(batch)
        return 2 * (x.detach() @ G - r[None]) + 2 * torch.exp(theta["log_lam"].detach()) * x.detach()

    def hvp(self, x, theta, batch, v):
        G, _ = self._gram(batch)
        return 2 * (v @ G) + 2 * torch.exp(theta["log_lam"].detach()) * v

    def mixed_vjp(self, x, theta, batch, q):
        return {"log_lam": (2 * torch.exp(theta["log_lam"].detach()) * x.detach() * q).sum(0)}

    def strong_convexity_constant(self, theta, batch):
        G, _ = self._gram(batch)
        return 2 * (float(torch.linalg.eigvalsh(G)[0]) + float(torch.exp(theta["log_lam"]).min()))


class PerFeatureRidgeOuter(OuterLoss):
    """Validation error ``agg_j (x_{v,j}ᵀŵ − y_{v,j})²`` (mean or sum)."""

    def __init__(self, convention: str = "mean"):
        super().__init__()
        _agg_div(convention, 1)
        self.convention = convention

    def forward(self, x, theta, batch):
        r = (x @ batch["Xv"].T - batch["yv"]) ** 2
        return r.mean() if self.convention == "mean" else r.sum()


def ridge_data(d: int, n: int, seed: int = 0, noise: float = 1.0, scale: float = 1.0):
    """``n`` training and ``n`` validation samples with ``d`` standard-normal features, true
    weights ``N(0, 1)``, noise ``N(0, noise²)``, everything multiplied by ``scale``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=DTYPE)
    X = torch.randn(n, d, generator=g, dtype=DTYPE)
    Xv = torch.randn(n, d, generator=g, dtype=DTYPE)
    y = X @ w + noise * torch.randn(n, generator=g, dtype=DTYPE)
    yv = Xv @ w + noise * torch.randn(n, generator=g, dtype=DTYPE)
    return {"X": scale * X, "y": scale * y, "Xv": scale * Xv, "yv": scale * yv}


_RIDGE_REFERENCE: Dict[tuple, Dict[str, Any]] = {}


def _ridge_reference(d: int, n: int, seed: int, noise: float, n_starts: int) -> Dict[str, Any]:
    """The optimum of the unscaled mean-convention problem (computed once per process):
    multi-start L-BFGS-B on the closed form over the box ``[−30, 30]ᵈ`` from θ = 0 and
    ``n_starts − 1`` starts ``3·N(0, 1)``."""
    key = (d, n, seed, noise, n_starts)
    if key not in _RIDGE_REFERENCE:
        batch = ridge_data(d, n, seed, noise, 1.0)
        inner, outer = PerFeatureRidgeInner("mean"), PerFeatureRidgeOuter("mean")
        rng = np.random.RandomState(seed + 1)
        starts = [np.zeros(d)] + [3 * rng.randn(d) for _ in range(n_starts - 1)]
        _RIDGE_REFERENCE[key] = closed_form_optimum(
            lambda t: outer(inner.closed_form(t, batch), {}, batch), starts, box=[(-30.0, 30.0)] * d)
    return _RIDGE_REFERENCE[key]


def per_feature_ridge(d: int = 20, n: Optional[int] = None, convention: str = "mean",
                      scale: float = 1.0, seed: int = 0, noise: float = 3.0, n_starts: int = 4):
    """Per-feature ridge, ``d`` hyperparameters, θ₀ = 0, no bounds (see the module docstring),
    ``n = 10d`` training and validation samples by default.

    The optimum: :func:`_ridge_reference` on the unscaled mean problem, moved to the units of
    this one exactly: data × ``s`` multiply Φ and ℓ by ``s²`` and the optimal ``λ`` by ``s²``;
    sums instead of means multiply Φ by ``n``, ℓ by ``n_v`` and ``λ`` by ``n``. So
    ``θ* = θ*₁ + 2 ln s (+ ln n)`` and ``ℓ* = s² (n_v) ℓ*₁``; ``info["mapped_check"]`` is the
    closed-form loss at the mapped ``θ*`` relative to ``ℓ*`` − 1 (round-off only).
    """
    n = 10 * d if n is None else n
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    ref = _ridge_reference(d, n, seed, noise, n_starts)
    batch = ridge_data(d, n, seed, noise, scale)
    inner, outer = PerFeatureRidgeInner(convention), PerFeatureRidgeOuter(convention)
    shift = 2 * math.log(scale) + (math.log(n) if convention == "sum" else 0.0)
    factor = scale ** 2 * (n if convention == "sum" else 1)

    def loss_at(theta):
        with torch.no_grad():
            return float(outer(inner.closed_form(theta["log_lam"].double(), batch), {}, batch))

    best_theta = ref["theta"] + shift
    best = factor * ref["loss"]
    check = loss_at({"log_lam": torch.tensor(best_theta, dtype=DTYPE)}) / best - 1
    at_box = int(np.sum(np.abs(ref["theta"]) > 29.9))
    info = dict(name=f"ridge d={d} {convention} x{scale:g}", best_loss=best,
                best_theta={"log_lam": best_theta.tolist()}, loss_at=loss_at, mu_available=True,
                reference=f"multi-start L-BFGS-B on the closed form ({n_starts} starts; {at_box} of "
                          f"{d} coordinates at the box ±30), moved to these units",
                start_gaps=[float(v / ref["loss"] - 1) for v in ref["start_losses"]],
                mapped_check=check, n_hyperparameters=d)
    theta0 = {"log_lam": torch.zeros(d, dtype=DTYPE)}
    return inner, outer, theta0, batch, None, info


# ---------------------------------------------------------------------------------------------
# (b) benchopt's generated quadratic ("simulated")
# ---------------------------------------------------------------------------------------------
class QuadraticInner(InnerProblem):
    """``Φ(z; θ) = ½zᵀHz + θᵀCz + bᵀz`` (one problem, ``z`` is ``(1, d_in)``), θ =
    ``{"outer_var": (d_out,)}``; strong convexity ``μ = λ_min(H)``."""

    theta_names = ("outer_var",)

    def objective(self, x, theta, batch):
        H, C, b = batch["H"], batch["C"], batch["b"]
        return 0.5 * ((x @ H) * x).sum(-1) + x @ (C.T @ theta["outer_var"]) + x @ b

    def init(self, theta, batch):
        return torch.zeros(1, batch["H"].shape[0], dtype=batch["H"].dtype)

    def closed_form(self, theta_vec: Tensor, batch) -> Tensor:
        return -torch.linalg.solve(batch["H"], batch["b"] + batch["C"].T @ theta_vec)[None]

    def strong_convexity_constant(self, theta, batch):
        return float(torch.linalg.eigvalsh(batch["H"])[0])


class QuadraticOuter(OuterLoss):
    """``ℓ(z, θ) = ½zᵀH_oz + ½θᵀK_oθ + θᵀC_oz + b_oᵀz``."""

    def forward(self, x, theta, batch):
        t, z = theta["outer_var"], x[0]
        return (0.5 * z @ batch["Ho"] @ z + 0.5 * t @ batch["Ko"] @ t + t @ batch["Co"] @ z
                + batch["bo"] @ z)


def _spd_stack(rng, n, d, mu, L, zero_first=False):
    """``n`` matrices ``U diag(spectrum) Uᵀ`` with random orthogonal ``U`` and the spectrum
    log-spaced in ``[mu, L]`` (a leading zero eigenvalue when ``zero_first``)."""
    out = np.empty((n, d, d))
    spec = (np.r_[0.0, np.logspace(np.log10(mu), np.log10(L), d - 1)] if zero_first
            else np.logspace(np.log10(mu), np.log10(L), d))
    for i in range(n):
        U, _ = np.linalg.qr(rng.randn(d, d))
        out[i] = (U * spec) @ U.T
    return out


def _quadratic_data(rng, n, d_in, d_out, mu, L):
    """Per-sample means of the generated matrices: ``(H, K, C, b)``."""
    H = _spd_stack(rng, n, d_in, mu, L).mean(0)
    K = _spd_stack(rng, n, d_out, mu, L, zero_first=True).mean(0)
    C = rng.randn(n, d_out, d_in).mean(0)
    b = rng.randn(n, d_in).mean(0)
    return H, K, C, b


def benchopt_quadratic(n_samples: int = 1024, dim: int = 5, mu: float = 0.1, L: float = 1.0,
                       seed: int = 2442):
    """The generated quadratic problem (module docstring), θ₀ = 0, no bounds; exact optimum."""
    for attempt in range(20):
        rng = np.random.RandomState(seed + attempt)
        H, _, C, b = _quadratic_data(rng, n_samples, dim, dim, mu, L)
        Ho, Ko, Co, bo = _quadratic_data(rng, n_samples, dim, dim, mu, L)
        J = -np.linalg.solve(H, C.T)
        z0 = -np.linalg.solve(H, b)
        P = J.T @ Ho @ J + Ko + Co @ J + J.T @ Co.T
        P = 0.5 * (P + P.T)
        if np.linalg.eigvalsh(P)[0] > 1e-8:
            break
    else:
        raise RuntimeError("could not draw a quadratic problem with a positive definite reduced Hessian")
    p = J.T @ Ho @ z0 + Co @ z0 + J.T @ bo
    theta_star = -np.linalg.solve(P, p)
    t = lambda a: torch.tensor(a, dtype=DTYPE)  # noqa: E731
    batch = {"H": t(H), "C": t(C), "b": t(b), "Ho": t(Ho), "Ko": t(Ko), "Co": t(Co), "bo": t(bo)}
    inner, outer = QuadraticInner(), QuadraticOuter()

    def loss_at(theta):
        with torch.no_grad():
            v = theta["outer_var"].double()
            return float(outer(inner.closed_form(v, batch), {"outer_var": v}, batch))

    best = loss_at({"outer_var": t(theta_star)})
    info = dict(name="benchopt quadratic", best_loss=best, best_theta={"outer_var": theta_star.tolist()},
                loss_at=loss_at, mu_available=True, n_hyperparameters=dim,
                reference=f"exact: θ* = −P⁻¹p of the reduced quadratic (λ_min(P) = "
                          f"{np.linalg.eigvalsh(P)[0]:.3g}, draw {attempt + 1})")
    theta0 = {"outer_var": torch.zeros(dim, dtype=DTYPE)}
    return inner, outer, theta0, batch, None, info


# ---------------------------------------------------------------------------------------------
# (c) data cleaning on scikit-learn's digits
# ---------------------------------------------------------------------------------------------
class WeightedLogRegInner(InnerProblem):
    """``Φ(W; θ) = (1/n) Σ_i σ(θ_i) CE(a_iᵀW, c_i) + ρ‖W‖²`` (one problem: ``x`` is the flat
    weight matrix, shape ``(1, p·K)``); ``θ = {"logit_weights": (n,)}``. Strongly convex with
    ``μ = 2ρ`` (the weighted cross-entropy is convex)."""

    theta_names = ("logit_weights",)

    def __init__(self, reg: float):
        self.reg = float(reg)

    def _logits(self, x, A, K):
        return (A @ x.reshape(x.shape[0], A.shape[1], K))  # (B, n, K)

    def objective(self, x, theta, batch):
        A, c, K = batch["A"], batch["c"], batch["n_classes"]
        logits = self._logits(x, A, K)
        ce = torch.logsumexp(logits, -1) - logits.gather(-1, c.expand(x.shape[0], -1)[..., None])[..., 0]
        w = torch.sigmoid(theta["logit_weights"])
        return (ce * w).mean(-1) + self.reg * (x ** 2).sum(-1)

    def init(self, theta, batch):
        return torch.zeros(1, batch["A"].shape[1] * batch["n_classes"], dtype=batch["A"].dtype)

    def strong_convexity_constant(self, theta, batch):
        return 2 * self.reg

    # closed forms (Z = AW, P = softmax(Z), Y one-hot, w = σ(θ), all over n):
    #   ∇Φ = Aᵀ(w ⊙ (P − Y))/n + 2ρW;  ∇²Φ V = Aᵀ(w ⊙ (P⊙AV − P ⊙ Σ_k(P⊙AV)))/n + 2ρV;
    #   (∇²_{Wθ}Φ)ᵀQ = σ'(θ) ⊙ Σ_k (AQ ⊙ (P − Y))/n
    def _parts(self, x, theta, batch):
        A, c, K = batch["A"], batch["c"], batch["n_classes"]
        W = x.detach().reshape(x.shape[0], A.shape[1], K)
        P = torch.softmax(A @ W, -1)
        R = P.clone()
        R[..., torch.arange(len(c)), c] -= 1.0
        w = torch.sigmoid(theta["logit_weights"].detach())
        return A, K, P, R, w

    def grad(self, x, theta, batch):
        A, K, P, R, w = self._parts(x, theta, batch)
        g = A.T @ (w[:, None] * R) / A.shape[0]
        return g.reshape(x.shape) + 2 * self.reg * x.detach()

    def linearize(self, x, theta, batch):
        A, K, P, R, w = self._parts(x, theta, batch)
        n, dw = A.shape[0], w * (1 - w)

        def hvp(v):
            AV = A @ v.reshape(v.shape[0], A.shape[1], K)
            PV = P * AV
            S = PV - P * PV.sum(-1, keepdim=True)
            return (A.T @ (w[:, None] * S) / n).reshape(v.shape) + 2 * self.reg * v

        def mixed(q):
            AQ = A @ q.reshape(q.shape[0], A.shape[1], K)
            return {"logit_weights": dw * (AQ * R).sum(-1).sum(0) / n}

        return hvp, mixed

    def hvp(self, x, theta, batch, v):
        return self.linearize(x, theta, batch)[0](v)

    def mixed_vjp(self, x, theta, batch, q):
        return self.linearize(x, theta, batch)[1](q)


class ValidationCrossEntropy(OuterLoss):
    """``ℓ = (1/n_v) Σ_j CE(a_{v,j}ᵀW, c_{v,j})`` (unweighted, clean labels)."""

    def forward(self, x, theta, batch):
        Av, cv, K = batch["Av"], batch["cv"], batch["n_classes"]
        logits = Av @ x[0].reshape(Av.shape[1], K)
        return (torch.logsumexp(logits, -1) - logits.gather(-1, cv[:, None])[:, 0]).mean()


def digits_data(n_train: int = 1024, corrupt: float = 0.5, seed: int = 0):
    """Digits (8×8, 1797 samples) shuffled with ``seed``: ``n_train`` training samples, the rest
    for validation; features standardised on the training part, a bias column appended; a
    fraction ``corrupt`` of the training labels replaced by a different random label."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    if not 0 < n_train < len(y):
        raise ValueError(f"n_train must lie in (0, {len(y)}), got {n_train!r}")
    if not 0 <= corrupt < 1:
        raise ValueError(f"corrupt must lie in [0, 1), got {corrupt!r}")
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(y))
    X, y = X[order], y[order]
    mean, std = X[:n_train].mean(0), X[:n_train].std(0)
    std[std == 0] = 1.0
    X = np.hstack([(X - mean) / std, np.ones((len(y), 1))])
    c = y[:n_train].copy()
    bad = rng.choice(n_train, int(round(corrupt * n_train)), replace=False)
    c[bad] = (c[bad] + rng.randint(1, 10, size=len(bad))) % 10  # always a different label
    t = lambda a: torch.tensor(a, dtype=DTYPE)  # noqa: E731
    return {"A": t(X[:n_train]), "c": torch.tensor(c), "Av": t(X[n_train:]),
            "cv": torch.tensor(y[n_train:]), "n_classes": 10,
            "corrupted": torch.tensor(np.sort(bad))}


def data_cleaning(n_train: int = 1024, corrupt: float = 0.5, reg: float = 1e-2, seed: int = 0,
                  ref_maxiter: int = 600, ref_tol: float = 1e-11):
    """Data cleaning (module docstring), θ₀ = 0 (all weights ½), no bounds. The best loss: an
    L-BFGS-B run on exact hypergradients (inner Newton-CG and CG at ``ref_tol``, up to
    ``ref_maxiter`` iterations, ``ftol = gtol = 0``: it runs until it cannot decrease)."""
    batch = digits_data(n_train, corrupt, seed)
    inner, outer = WeightedLogRegInner(reg), ValidationCrossEntropy()
    theta0 = {"logit_weights": torch.zeros(n_train, dtype=DTYPE)}
    ref = exact_lbfgsb(inner, outer, theta0, batch, None, tol=ref_tol, maxiter=ref_maxiter,
                       options=dict(ftol=0.0, gtol=0.0, maxcor=20))

    def loss_at(theta, _cache={}):
        sol = solve_inner(inner, theta, batch, ref_tol, x0=_cache.get("x"), max_iter=200)
        _cache["x"] = sol.x
        with torch.no_grad():
            return float(outer(sol.x, theta, batch))

    best_w = torch.sigmoid(ref["theta"]["logit_weights"])
    bad = torch.zeros(n_train, dtype=torch.bool)
    bad[batch["corrupted"]] = True
    info = dict(name="data cleaning", best_loss=min(ref["loss"], ref["best_seen"]),
                best_theta=None, loss_at=loss_at, mu_available=True, n_hyperparameters=n_train,
                reference=f"L-BFGS-B on exact hypergradients, {ref['nit']} iterations / "
                          f"{ref['nfev']} evaluations, {ref['seconds']:.0f} s: {ref['message'][:60]}",
                reference_run={k: ref[k] for k in ("loss", "nit", "nfev", "cost", "seconds", "message")},
                mean_weight_clean=float(best_w[~bad].mean()),
                mean_weight_corrupted=float(best_w[bad].mean()))
    return inner, outer, theta0, batch, None, info


if __name__ == "__main__":  # a library of problems; benchmarks/outer_loops.py runs them
    import sys as _sys
    sys_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    _sys.path.insert(0, sys_path)
    from recon.scripts import help_parser
    help_parser(__doc__ + "\nRun them with: python benchmarks/outer_loops.py").parse_args()
    print("problems: per_feature_ridge, benchopt_quadratic, data_cleaning "
          "(run them with python benchmarks/outer_loops.py)")
