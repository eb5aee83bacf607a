"""Data-parallel bilevel optimisation on ``torch.distributed`` (samples sharded over ranks).

Inner problems are per sample (``Φ`` returns one value per sample, solvers and CG stop per
sample), so each rank solves the inner problems and the adjoint systems of its own shard only.
What couples the samples is reduced over the default process group:

* the upper loss ``ℓ = Σ_r w_r ℓ_r`` with ``ℓ_r`` the user's loss on shard ``r`` (``n_r``
  samples of ``N = Σ_r n_r``) and ``w_r = n_r/N`` when the loss declares ``reduction = "mean"``
  (the default: a shard mean plus sample-independent terms such as ``λ‖θ‖²``, which the weights
  count exactly once) or ``w_r = 1`` for ``reduction = "sum"`` (a plain sum over samples, no
  sample-independent terms); every rank differentiates ``w_r ℓ_r``, so the hypergradient
  ``∇ℓ = Σ_r ∇(w_r ℓ_r)`` and the outer loss' parameter gradients are one all-reduce (sum);
* iteration counts (max), convergence flags (all), the tolerance references (max over all
  samples, e.g. HOAG's ``R = max_b ‖∇ₓΦ_b(x⁰)‖``), the dual-weighted corrections ``⟨q, ∇ₓΦ⟩``
  and MAID's error-bound norms (sums of squares, sums, maxima, the Gram matrix ``BᵀB``).

θ is the same on every rank (checked at the start), every decision of HOAG / MAID reads
reduced quantities only, so the ranks stay in lockstep and the θ trajectory equals the
one-process run on the whole batch (up to round-off of the sums).

The reductions are active only inside :func:`data_parallel` (which
:meth:`bilevel.outer.OuterLoop.run` enters by itself when a default process group with more
than one rank is initialised); outside it, and with no process group or one rank, every helper
here returns its input unchanged and costs one flag test.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["rank", "world_size", "group_ready", "is_active", "data_parallel", "all_reduce",
           "all_reduce_floats", "all_reduce_dict", "check_same", "shard_batch", "shard_range",
           "ShardWeightedLoss", "shard_weight", "comm_stats", "reset_comm_stats",
           "DistributedError", "reduce_hypergradient", "global_norm"]

_OPS = ("sum", "max", "min")
_ACTIVE = False
_STATS = {"calls": 0, "bytes": 0}


class DistributedError(ValueError):
    """Ranks disagree on something that must be identical (θ names or values, world size)."""


def group_ready() -> bool:
    """Whether a default process group with more than one rank is initialised."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def rank() -> int:
    """This process' rank in the default group (0 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def world_size() -> int:
    """Number of ranks in the default group (1 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def is_active() -> bool:
    """Whether the bilevel reductions are on (inside :func:`data_parallel` with > 1 rank)."""
    return _ACTIVE


@contextlib.contextmanager
def data_parallel() -> Iterator[bool]:
    """Turn the reductions on for the ``with`` block when :func:`group_ready`; yields whether they
    are on. Re-entrant."""
    global _ACTIVE
    before = _ACTIVE
    _ACTIVE = before or group_ready()
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = before


def comm_stats() -> Dict[str, int]:
    """Collectives issued by this module since :func:`reset_comm_stats`: ``calls`` and payload
    ``bytes`` (per rank, sent once by each rank into the all-reduce)."""
    return dict(_STATS)


def reset_comm_stats() -> None:
    """Zero the counters of :func:`comm_stats`."""
    _STATS["calls"] = _STATS["bytes"] = 0


def _device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce_(t: Tensor, op: str) -> Tensor:
    if op not in _OPS:
        raise ValueError(f"op must be one of {_OPS}, got {op!r}")
    red = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
           "min": torch.distributed.ReduceOp.MIN}[op]
    _STATS["calls"] += 1
    _STATS["bytes"] += t.numel() * t.element_size()
    torch.distributed.all_reduce(t, op=red)
    return t


def all_reduce(value: Union[float, int, bool, Tensor], op: str = "sum"):
    """``op`` over the ranks (``sum``, ``max``, ``min``; for ``bool``: ``min`` = all, ``max`` =
    any) of a number or tensor, returned as the same type (a new tensor). Identity when not
    :func:`is_active`."""
    if not _ACTIVE:
        return value
    if isinstance(value, Tensor):
        t = value.detach().clone()
        dev = _device()
        return _reduce_(t.to(dev), op).to(value.device)
    kind = type(value)
    out = all_reduce_floats([float(value)], op)[0]
    return bool(out) if kind is bool else int(out) if kind is int else out


def all_reduce_floats(values: Sequence[float], op: str = "sum") -> List[float]:
    """Several floats reduced in one collective (float64). Identity when not active."""
    if not _ACTIVE:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    return [float(v) for v in _reduce_(t, op).cpu()]


def all_reduce_dict(d: Mapping[str, Tensor], op: str = "sum",
                    extra: Sequence[float] = ()) -> Tuple[Dict[str, Tensor], List[float]]:
    """Reduce every tensor of ``d`` and the floats ``extra`` in ONE collective (packed in a
    float64 vector in the key order of ``d``). Returns ``(new dict, reduced extras)``; identity
    when not active."""
    if not _ACTIVE:
        return dict(d), [float(v) for v in extra]
    keys = list(d)
    dev = _device()
    parts = [d[k].detach().reshape(-1).to(dev, torch.float64) for k in keys]
    parts.append(torch.tensor([float(v) for v in extra], dtype=torch.float64, device=dev))
    flat = _reduce_(torch.cat(parts), op)
    out, i = {}, 0
    for k in keys:
        n = d[k].numel()
        out[k] = flat[i:i + n].reshape(d[k].shape).to(d[k].device, d[k].dtype)
        i += n
    return out, [float(v) for v in flat[i:].cpu()]


def check_same(obj: Any, name: str) -> None:
    """Raise :class:`DistributedError` naming ``name`` unless ``obj`` (picklable, compared with
    ``==``) is the same on every rank. Identity when not active."""
    if not _ACTIVE:
        return
    seen: List[Any] = [None] * world_size()
    torch.distributed.all_gather_object(seen, obj)
    if any(s != seen[0] for s in seen):
        raise DistributedError(f"{name} differs between ranks: " +
                               ", ".join(f"rank {r}: {s!r}" for r, s in enumerate(seen)))


def shard_range(n: int, rank_: Optional[int] = None, world: Optional[int] = None) -> range:
    """Sample indices of rank ``rank_`` out of ``world`` for ``n`` samples: contiguous blocks,
    the first ``n mod world`` ranks one sample longer (so concatenating the shards in rank order
    gives the batch back). ``ValueError`` when ``world > n``."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if not (isinstance(world, int) and world >= 1 and 0 <= rank_ < world):
        raise ValueError(f"need 0 ≤ rank < world, got rank={rank_!r}, world={world!r}")
    if world > n:
        raise ValueError(f"world size {world} is larger than the number of samples {n}: every "
                         f"rank needs at least one sample; use at most {n} processes")
    size, extra = divmod(n, world)
    start = rank_ * size + min(rank_, extra)
    return range(start, start + size + (1 if rank_ < extra else 0))


def shard_batch(batch: Any, rank_: Optional[int] = None, world: Optional[int] = None) -> Any:
    """This rank's shard of ``batch`` (tensors in dicts, lists and tuples are sliced along dim 0
    by :func:`shard_range`; other leaves are kept). All tensors must have the same length."""
    sizes = set()

    def lengths(obj):
        if isinstance(obj, Tensor) and obj.dim() > 0:
            sizes.add(obj.shape[0])
        elif isinstance(obj, Mapping):
            for v in obj.values():
                lengths(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                lengths(v)

    lengths(batch)
    if len(sizes) != 1:
        raise ValueError(f"batch: its tensors must share one batch length to be sharded, got "
                         f"lengths {sorted(sizes)}")
    idx = shard_range(sizes.pop(), rank_, world)

    def cut(obj):
        if isinstance(obj, Tensor) and obj.dim() > 0:
            return obj[idx.start:idx.stop]
        if isinstance(obj, Mapping):
            return {k: cut(v) for k, v in obj.items()}
        if isinstance(obj, tuple):
            return tuple(cut(v) for v in obj)
        if isinstance(obj, list):
            return [cut(v) for v in obj]
        return obj

    return cut(batch)


def shard_weight(n_local: int, reduction: str = "mean") -> float:
    """``w_r`` of the module docstring: ``n_r/N`` (``"mean"``) or ``1`` (``"sum"``); ``N`` is
    all-reduced. ``ValueError`` for an unknown reduction or a rank without samples."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"outer.reduction must be 'mean' or 'sum', got {reduction!r}")
    fewest = all_reduce(float(n_local), "min")
    total = int(all_reduce(float(n_local), "sum"))
    if fewest < 1:
        raise ValueError(f"a rank holds no samples (world size {world_size()} is larger than the "
                         f"number of samples {total}); use at most {total} processes")
    return 1.0 if reduction == "sum" else n_local / total


class ShardWeightedLoss(nn.Module):
    """``w · ℓ_r(x, θ, batch)``: a user's :class:`~bilevel.OuterLoss` on this rank's shard,
    weighted by ``w`` (:func:`shard_weight`), whose trainable parameters are the user's."""

    def __init__(self, outer: nn.Module, weight: float):
        super().__init__()
        self.inner_loss, self.weight = outer, float(weight)

    def forward(self, x: Tensor, theta, batch) -> Tensor:
        return self.inner_loss(x, theta, batch) * self.weight

    def trainable_parameters(self) -> Dict[str, nn.Parameter]:
        get = getattr(self.inner_loss, "trainable_parameters", None)
        return dict(get()) if get is not None else {}


def reduce_hypergradient(hg) -> Any:
    """Make a hypergradient computed on this rank's shard (with a shard-weighted loss) global:
    ``loss``, ``theta_grad``, ``param_grads`` summed, ``cg_iterations`` max, ``cg_converged``
    all -- two collectives. Returns ``hg`` (modified). Identity when not active."""
    if not _ACTIVE:
        return hg
    names = list(hg.theta_grad)
    pnames = list(hg.param_grads)
    packed = {**{"t:" + k: hg.theta_grad[k] for k in names},
              **{"p:" + k: hg.param_grads[k] for k in pnames}}
    red, (loss,) = all_reduce_dict(packed, "sum", extra=[hg.loss])
    hg.loss = loss
    hg.theta_grad = {k: red["t:" + k] for k in names}
    hg.param_grads = {k: red["p:" + k] for k in pnames}
    it, bad = all_reduce_floats([hg.cg_iterations, 0.0 if hg.cg_converged else 1.0], "max")
    hg.cg_iterations, hg.cg_converged = int(it), bad == 0.0
    return hg


def global_norm(local_sq_sum: float) -> float:
    """``sqrt(Σ_r s_r)`` for local sums of squares ``s_r`` (the norm of a vector stacked over
    ranks)."""
    return math.sqrt(max(all_reduce(float(local_sq_sum), "sum"), 0.0))
