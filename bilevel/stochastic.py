"""Outer optimisers of :class:`~bilevel.MinibatchBilevel` (steps on θ from minibatch
hypergradients ``g_k``), each with a checkpointable state.

* ``"adam"`` / ``"sgd"``: ``torch.optim.Adam`` / ``torch.optim.SGD`` on θ with the learning rate
  ``lr·s(k/K)`` (``K`` steps in all): ``s = ½(1 + cos πt)`` (``"cosine"``, floored at
  ``lr_min``), ``1`` (``"constant"``), or ``0.1^{⌊4t⌋−1}`` after the half (``"step"``: ×0.1 at
  50 % and 75 % of the run); θ is projected onto the bounds after every step.
* ``"sag"``: the stochastic average gradient over *fixed* minibatches ``j = 1..J`` (Le Roux,
  Schmidt & Bach 2012; the variance-reduced bilevel method SABA of Dagréou et al. 2022 keeps the
  same memory): ``ḡ = (1/J')Σ_j m_j`` with ``m_j`` the last hypergradient of minibatch ``j``
  (``J'`` minibatches seen so far), preconditioned per coordinate by the root mean square of the
  memory, ``θ ← Π(θ − lr_k ḡ/(√(mean_j m_j²) + δ))`` (``δ = 10⁻¹²·max``), with the same
  schedule ``lr_k`` as Adam: each coordinate moves by at most ``lr_k`` per step, whatever the
  units. (Plain SAG steps ``α ḡ`` with a scale-free ``α`` — first move of length ``lr``,
  Barzilai–Borwein per epoch — zigzagged between the log-weight and log-smoothing directions on
  TV denoising and were dropped.)
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor

from .problem import Bounds, Theta, project

__all__ = ["OPTIMIZERS", "SCHEDULES", "make_optimizer", "TorchStep", "SAGStep"]

OPTIMIZERS = ("adam", "sgd", "sag")
SCHEDULES = ("cosine", "constant", "step")


def _factor(schedule: str, t: float, lr_min: float) -> float:
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 1.0 if t < 0.5 else (0.1 if t < 0.75 else 0.01)
    return max(0.5 * (1.0 + math.cos(math.pi * min(t, 1.0))), lr_min)


class TorchStep:
    """Adam or SGD (``torch.optim``) on the θ tensors with a learning-rate schedule (module
    docstring); ``state_dict`` holds the optimiser's and the scheduler's state."""

    def __init__(self, kind: str, theta: Theta, lr: float, schedule: str, total_steps: int,
                 lr_min: float, bounds: Optional[Bounds], options: Mapping[str, Any]):
        self.names = sorted(theta)
        self.params = {n: theta[n].detach().clone().requires_grad_(True) for n in self.names}
        cls = torch.optim.Adam if kind == "adam" else torch.optim.SGD
        self.opt = cls([self.params[n] for n in self.names], lr=lr, **dict(options))
        total = max(int(total_steps), 1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda k: _factor(schedule, k / total, lr_min))
        self.bounds = bounds

    @property
    def step_size(self) -> float:
        """The learning rate of the next step."""
        return float(self.opt.param_groups[0]["lr"])

    def step(self, theta: Theta, grad: Theta, batch_id: int) -> Theta:
        """One step from the minibatch hypergradient ``grad`` (θ is the optimiser's own copy)."""
        for n in self.names:
            self.params[n].grad = grad[n].detach().to(self.params[n].dtype).reshape(self.params[n].shape)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            new = project({n: p.detach() for n, p in self.params.items()}, self.bounds)
            for n in self.names:
                self.params[n].copy_(new[n])
        return {n: self.params[n].detach().clone() for n in self.names}

    def end_epoch(self, theta: Theta, epoch_loss: float) -> None:
        """Nothing to do between epochs (the schedule runs per step)."""

    def state_dict(self) -> Dict[str, Any]:
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])


def _flat(d: Mapping[str, Tensor], names: List[str]) -> Tensor:
    return torch.cat([d[n].detach().reshape(-1).double().cpu() for n in names])


class SAGStep:
    """Stochastic average gradient over fixed minibatches with per-coordinate RMS scaling and a
    learning-rate schedule (module docstring); all its state is tensors and numbers."""

    def __init__(self, theta: Theta, lr: float, n_batches: int, bounds: Optional[Bounds],
                 schedule: str = "cosine", total_steps: int = 1, lr_min: float = 0.0):
        self.names = sorted(theta)
        self.shapes = {n: (theta[n].shape, theta[n].dtype, theta[n].device) for n in self.names}
        d = sum(theta[n].numel() for n in self.names)
        self.lr, self.J, self.bounds = float(lr), int(n_batches), bounds
        self.schedule, self.total, self.lr_min = schedule, max(int(total_steps), 1), lr_min
        self.mem = torch.zeros(self.J, d, dtype=torch.float64)
        self.seen = torch.zeros(self.J, dtype=torch.bool)
        self.total_grad = torch.zeros(d, dtype=torch.float64)
        self.k = 0

    def _unflat(self, v: Tensor) -> Theta:
        out, i = {}, 0
        for n in self.names:
            shape, dtype, device = self.shapes[n]
            k = int(torch.Size(shape).numel())
            out[n] = v[i:i + k].reshape(shape).to(device, dtype)
            i += k
        return out

    @property
    def step_size(self) -> float:
        """The learning rate of the next step."""
        return self.lr * _factor(self.schedule, self.k / self.total, self.lr_min)

    def step(self, theta: Theta, grad: Theta, batch_id: int) -> Theta:
        """Replace minibatch ``batch_id``'s memory by ``grad``, then
        ``θ ← Π(θ − lr_k ḡ/(RMS + δ))``."""
        j = batch_id % self.J
        g = _flat(grad, self.names)
        self.total_grad += g - self.mem[j] if bool(self.seen[j]) else g
        self.mem[j], self.seen[j] = g, True
        seen = int(self.seen.sum())
        avg = self.total_grad / seen
        rms = (self.mem[self.seen] ** 2).mean(0).sqrt()
        delta = 1e-12 * float(rms.max()) + 1e-300
        move = self.step_size * avg / (rms + delta)
        self.k += 1
        return project(self._unflat(_flat(theta, self.names) - move), self.bounds)

    def end_epoch(self, theta: Theta, epoch_loss: float) -> None:
        """Nothing to do between epochs (the schedule runs per step)."""

    def state_dict(self) -> Dict[str, Any]:
        return {"mem": self.mem, "seen": self.seen, "total": self.total_grad, "k": self.k}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mem, self.seen = state["mem"].clone(), state["seen"].clone()
        self.total_grad, self.k = state["total"].clone(), int(state["k"])


def make_optimizer(kind: str, theta: Theta, *, lr: float, schedule: str, total_steps: int,
                   lr_min: float, n_batches: int, bounds: Optional[Bounds],
                   options: Mapping[str, Any]):
    """The outer optimiser named ``kind`` (one of :data:`OPTIMIZERS`) at θ."""
    if kind == "sag":
        return SAGStep(theta, lr, n_batches, bounds, schedule, total_steps, lr_min)
    return TorchStep(kind, theta, lr, schedule, total_steps, lr_min, bounds, options)
