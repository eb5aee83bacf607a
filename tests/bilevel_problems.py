"""Small bilevel problems with closed-form solutions, shared by the bilevel tests."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from bilevel import InnerProblem, OuterLoss


class QuadraticInner(InnerProblem):
    """``Φ_b(x; θ) = ½ xᵀ M(θ) x − (c_b + Bθ)ᵀx`` with ``M(θ) = M₀ + Σ_k θ_k M_k`` SPD.

    θ = ``{"t": vector of length K}``; closed form ``x̂_b(θ) = M(θ)⁻¹ (c_b + Bθ)``.
    """

    theta_names = ("t",)

    def __init__(self, M0: Tensor, Ms: Tensor, Bmat: Tensor):
        self.M0, self.Ms, self.B = M0, Ms, Bmat  # (n,n), (K,n,n), (n,K)

    def M(self, t):
        return self.M0 + torch.einsum("k,kij->ij", t, self.Ms)

    def objective(self, x, theta, batch):
        t = theta["t"]
        M = self.M(t)
        rhs = batch["c"] + (self.B @ t)[None]
        return 0.5 * torch.einsum("bi,ij,bj->b", x, M, x) - (rhs * x).sum(1)

    def init(self, theta, batch):
        return torch.zeros_like(batch["c"])

    def closed_form(self, t, batch):
        rhs = batch["c"] + (self.B @ t)[None]
        return torch.linalg.solve(self.M(t), rhs.T).T


class QuadraticOuter(OuterLoss):
    """``ℓ = ½ mean_b ‖x_b − target_b‖² + r·θ`` (a direct θ term tests ∇_θℓ)."""

    def __init__(self, r: Tensor):
        super().__init__()
        self.r = r

    def forward(self, x, theta, batch):
        return 0.5 * ((x - batch["target"]) ** 2).sum(1).mean() + (self.r * theta["t"]).sum()


def random_quadratic(seed: int, n: int = 6, K: int = 3, B: int = 4):
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    A = torch.randn(n, n, generator=g, dtype=dt)
    M0 = A @ A.T + n * torch.eye(n, dtype=dt)
    Ms = []
    for _ in range(K):
        C = torch.randn(n, n, generator=g, dtype=dt)
        Ms.append(0.1 * C @ C.T)  # PSD, so M(θ) stays SPD for θ ≥ 0
    Ms = torch.stack(Ms)
    Bmat = torch.randn(n, K, generator=g, dtype=dt)
    batch = {"c": torch.randn(B, n, generator=g, dtype=dt),
             "target": torch.randn(B, n, generator=g, dtype=dt)}
    t = torch.rand(K, generator=g, dtype=dt)
    r = 0.1 * torch.randn(K, generator=g, dtype=dt)
    return QuadraticInner(M0, Ms, Bmat), QuadraticOuter(r), {"t": t}, batch


class ShrinkageInner(InnerProblem):
    """``Φ_b(x; θ) = mean((x − y)²) + e^{θ} mean(x²)``: ``x̂ = y / (1 + e^{θ})``."""

    theta_names = ("log_reg",)

    def objective(self, x, theta, batch):
        return ((x - batch["y"]) ** 2).flatten(1).mean(1) + torch.exp(theta["log_reg"]) * (x ** 2).flatten(1).mean(1)

    def init(self, theta, batch):
        return batch["y"].clone()


class ScaledTargetOuter(OuterLoss):
    """``ℓ = mean((x − c·y)²)``; with ``ShrinkageInner`` the optimum is ``e^{θ*} = 1/c − 1``."""

    def forward(self, x, theta, batch):
        return ((x - batch["target"]) ** 2).mean()


class RidgeInner(InnerProblem):
    """Ridge regression ``Φ(w; θ) = c·agg((Xw − y)²) + c·λ‖w‖²`` with ``agg`` the mean or the sum
    over the ``n`` training samples; ``λ = e^{θ}`` (``param="log"``) or ``λ = θ`` (``"raw"``,
    ill-posed for ``λ < 0`` when ``n < d``). One problem per batch sample: ``w`` is ``(1, d)``."""

    theta_names = ("lam",)

    def __init__(self, convention: str = "mean", scale: float = 1.0, param: str = "log"):
        self.convention, self.scale, self.param = convention, scale, param

    def lam(self, theta):
        return torch.exp(theta["lam"]) if self.param == "log" else theta["lam"]

    def _agg(self, r):
        return r.mean(-1) if self.convention == "mean" else r.sum(-1)

    def objective(self, x, theta, batch):
        resid = x @ batch["X"].T - batch["y"]
        return self.scale * (self._agg(resid ** 2) + self.lam(theta) * (x ** 2).sum(-1))

    def init(self, theta, batch):
        return torch.zeros(1, batch["X"].shape[1], dtype=batch["X"].dtype)

    def strong_convexity_constant(self, theta, batch):
        return 2 * self.scale * float(self.lam(theta))

    def closed_form(self, lam: float, batch):
        X, y = batch["X"], batch["y"]
        G = X.T @ X
        rhs = X.T @ y
        if self.convention == "mean":
            G, rhs = G / X.shape[0], rhs / X.shape[0]
        return torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), rhs)[None]


class RidgeOuter(OuterLoss):
    """Validation error ``c·agg((X_v w − y_v)²)`` (mean or sum)."""

    def __init__(self, convention: str = "mean", scale: float = 1.0):
        super().__init__()
        self.convention, self.scale = convention, scale

    def forward(self, x, theta, batch):
        r = (x @ batch["Xv"].T - batch["yv"]) ** 2
        return self.scale * (r.mean() if self.convention == "mean" else r.sum())


def ridge_problem(n: int, seed: int = 0, d: int = 20, noise: float = 2.0):
    """A ridge data set with an interior hyper-optimum: ``n`` training and ``n`` validation
    samples, ``d`` features, true weights ``~N(0, 1/d)``, noise ``σ = noise``."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    w = torch.randn(d, generator=g, dtype=dt) / d ** 0.5
    X = torch.randn(n, d, generator=g, dtype=dt)
    Xv = torch.randn(n, d, generator=g, dtype=dt)
    return {"X": X, "y": X @ w + noise * torch.randn(n, generator=g, dtype=dt),
            "Xv": Xv, "yv": Xv @ w + noise * torch.randn(n, generator=g, dtype=dt)}


def ridge_optimum(inner: RidgeInner, outer: RidgeOuter, batch) -> float:
    """The exact hyper-optimum ``λ*`` by a fine bounded scalar search on the closed form."""
    from scipy.optimize import minimize_scalar

    def f(log_lam):
        with torch.no_grad():
            return float(outer(inner.closed_form(float(np.exp(log_lam)), batch), {}, batch))

    res = minimize_scalar(f, bounds=(-40.0, 40.0), method="bounded",
                          options={"xatol": 1e-12, "maxiter": 500})
    return float(np.exp(res.x))


class ShiftInner(InnerProblem):
    """``Φ_b(x; θ) = ½‖x − Aθ‖²``: ``x̂ = Aθ`` for every sample (θ = ``{"t": vector}``)."""

    theta_names = ("t",)

    def __init__(self, A: Tensor):
        self.A = A

    def objective(self, x, theta, batch):
        return 0.5 * ((x - (self.A @ theta["t"])[None]) ** 2).sum(1)

    def init(self, theta, batch):
        return torch.zeros_like(batch["target"])


def valley(condition: float = 1e3, dtype=torch.float64):
    """A narrow rotated valley ``ℓ(θ) = ½‖Aθ − b‖²`` (``AᵀA`` with condition number
    ``condition``, axes at 30° to the coordinates), optimum ``θ* = (1, −2)`` at loss 0; returns
    ``(inner, outer, θ₀ = 0, batch, θ*)``."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    R = torch.tensor([[c, -s], [s, c]], dtype=dtype)
    A = R @ torch.diag(torch.tensor([1.0, condition ** -0.5], dtype=dtype)) @ R.T
    opt = torch.tensor([1.0, -2.0], dtype=dtype)
    batch = {"target": (A @ opt)[None].repeat(3, 1)}
    outer = QuadraticOuter(torch.zeros(2, dtype=dtype))  # ½ mean_b ‖x_b − b‖², no θ term
    return ShiftInner(A), outer, {"t": torch.zeros(2, dtype=dtype)}, batch, opt


def small_quickstart(dtype=torch.float64):
    """The quickstart problem at a smaller size: smoothed-TV denoising of four 32² patches
    (σ = 0.1) for the MSE, θ₀ = (−5, −3), ``log_smoothing`` in [−12, 2]; returns
    ``(inner, outer, θ₀, batch, bounds)``."""
    from bilevel import Bounds
    from recon.data.natural_images import denoising_batch
    from recon.losses import MSEToTarget
    from recon.problems import TVDenoising

    batch = denoising_batch(4, 32, 0.1, seed=0, dtype=dtype)
    theta0 = {"log_weight": torch.tensor(-5.0, dtype=dtype),
              "log_smoothing": torch.tensor(-3.0, dtype=dtype)}
    bounds = Bounds(lower={"log_smoothing": -12.0}, upper={"log_smoothing": 2.0})
    return TVDenoising(), MSEToTarget(), theta0, batch, bounds
