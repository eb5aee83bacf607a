"""Small bilevel problems with closed-form solutions, shared by the bilevel tests."""
from __future__ import annotations

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
