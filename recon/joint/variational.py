r"""Task-driven variational CT: θ of :class:`recon.problems.VariationalCT` learned by HOAG.

``x̂(θ) = argmin_x ‖Ax − y‖²/m + e^{θ₀}·SmoothedTV(x; θ₁)``, warm-started from the FBP (or a
learned LSPD output), and

* ``"mse"``: ``θ`` minimising ``mean (x̂(θ) − x*)²`` (the sequential choice);
* ``"task"``: ``θ`` minimising ``(CE + Dice)(S*(x̂(θ)), s)`` with ``S*`` a segmenter trained
  on clean images and kept frozen (:class:`recon.tasks.TaskOperator`).

Both are scored with the same ``S*`` on the test reconstructions.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from bilevel import HOAG, Bounds, solve_inner
from recon.problems import VariationalCT

from .losses import JointLoss

__all__ = ["learn_tv_theta", "tv_reconstruct", "TV_BOUNDS", "TV_THETA0"]

#: initial θ (``log_weight``, ``log_smoothing``) and box bounds of the HOAG runs
TV_THETA0 = {"log_weight": -6.0, "log_smoothing": -6.0}
TV_BOUNDS = Bounds(lower={"log_weight": -14.0, "log_smoothing": -12.0},
                   upper={"log_weight": 2.0, "log_smoothing": 0.0})


def _batch(data: Mapping[str, Tensor], dtype: torch.dtype, x0: Optional[Tensor]) -> dict:
    batch = {k: data[k].to(dtype) for k in ("sinogram", "image", "mask")}
    batch["fbp"] = (data["fbp"] if x0 is None else x0).to(dtype)
    return batch


def learn_tv_theta(operator: Any, data: Mapping[str, Tensor], objective: str = "mse",
                   segmenter: Optional[nn.Module] = None, max_iter: int = 12,
                   x0: Optional[Tensor] = None, dtype: torch.dtype = torch.float64,
                   progress: bool = False) -> tuple[dict, Any]:
    """HOAG-learned ``θ`` (floats) for ``objective`` ``"mse"`` or ``"task"`` on ``data`` (a
    training subset; ``x0``: warm starts, FBP by default). Returns ``(θ, bilevel.Result)``."""
    from recon.losses import MSEToTarget
    from recon.tasks import TaskOperator

    if objective not in ("mse", "task"):
        raise ValueError(f"objective must be 'mse' or 'task', got {objective!r}")
    if objective == "task":
        if segmenter is None:
            raise ValueError("objective='task' needs the clean segmenter, got segmenter=None")
        frozen = TaskOperator(copy.deepcopy(segmenter).to(dtype))
        outer: nn.Module = JointLoss(frozen, 1.0)
    else:
        outer = MSEToTarget("image")
    batch = _batch(data, dtype, x0)
    theta0 = {k: torch.tensor(v, dtype=dtype) for k, v in TV_THETA0.items()}
    hoag = HOAG(VariationalCT(operator), outer, max_iter=max_iter, bounds=TV_BOUNDS,
                progress=progress)
    result = hoag.run(theta0, batch, x0=batch["fbp"])
    return {k: float(v) for k, v in result.theta.items()}, result


def tv_reconstruct(operator: Any, theta: Mapping[str, float], data: Mapping[str, Tensor],
                   rtol: float = 1e-4, x0: Optional[Tensor] = None,
                   dtype: torch.dtype = torch.float64, max_iter: int = 100) -> tuple[Tensor, dict]:
    """``x̂(θ)`` of every sample, Newton-CG to ``‖∇ₓΦ_b‖ ≤ rtol·max_b‖∇ₓΦ_b(x⁰)‖``.

    Returns ``(x̂ as float32, {"iterations", "converged"})``."""
    inner = VariationalCT(operator)
    th = {k: torch.tensor(float(v), dtype=dtype) for k, v in theta.items()}
    batch = _batch(data, dtype, x0)
    g0 = inner.grad(batch["fbp"], th, batch).flatten(1).norm(dim=1).max()
    sol = solve_inner(inner, th, batch, float(rtol * g0), x0=batch["fbp"], method="newton-cg",
                      max_iter=max_iter)
    return sol.x.float(), {"iterations": int(sol.iterations.max()),
                           "converged": bool(sol.converged.all())}
