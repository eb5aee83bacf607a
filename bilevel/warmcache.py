"""Per-sample warm starts for streamed (minibatch) bilevel learning, and indexed data sets.

A data set for :class:`~bilevel.MinibatchBilevel` yields **dict samples with an integer
``"index"``** (the sample's position in the data set, ``0 ≤ index < len(dataset)``); the loop
keys its warm starts by it. :class:`IndexedDataset` adds that key to a dict of tensors or to a
data set of dicts.

:class:`WarmStartCache` keeps, per sample index, the last inner solution ``x_b`` and CG adjoint
``q_b`` (detached copies, on ``device``, CPU by default), least recently used first out, within
``max_bytes`` and ``max_items``: memory stays bounded whatever the data-set size.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["INDEX_KEY", "IndexedDataset", "WarmStartCache", "batch_indices"]

#: the key of a sample's position in its data set
INDEX_KEY = "index"


class IndexedDataset(Dataset):
    """``dataset[i] = {**sample_i, "index": i}`` over a dict of equal-length tensors
    (``{"y": (N, ...), "image": (N, ...)}``) or over any data set whose items are dicts."""

    def __init__(self, data: Any):
        if isinstance(data, Mapping):
            lengths = {k: (v.shape[0] if isinstance(v, Tensor) and v.dim() else None)
                       for k, v in data.items()}
            if not lengths or None in lengths.values() or len(set(lengths.values())) != 1:
                raise ValueError(f"data: a dict of tensors sharing one first dimension is needed, "
                                 f"got lengths {lengths}")
            if INDEX_KEY in data:
                raise ValueError(f"data already has a key {INDEX_KEY!r}; pass it without one")
        elif not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
            raise TypeError(f"data must be a dict of tensors or a Dataset of dicts, got "
                            f"{type(data).__name__}")
        self.data = data

    def __len__(self) -> int:
        if isinstance(self.data, Mapping):
            return int(next(iter(self.data.values())).shape[0])
        return len(self.data)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if isinstance(self.data, Mapping):
            item = {k: v[i] for k, v in self.data.items()}
        else:
            item = self.data[i]
            if not isinstance(item, Mapping):
                raise TypeError(f"data[{i}] must be a dict sample, got {type(item).__name__}")
            item = dict(item)
        item[INDEX_KEY] = int(i)
        return item


def batch_indices(batch: Any) -> List[int]:
    """The sample indices of a collated batch (``batch["index"]``, a 1-d integer tensor or
    list), with a clear error when they are missing."""
    if not isinstance(batch, Mapping) or INDEX_KEY not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"every batch must be a dict with the sample indices under "
                         f"{INDEX_KEY!r} (wrap the data set in bilevel.minibatch.IndexedDataset); "
                         f"got {keys}")
    idx = batch[INDEX_KEY]
    if isinstance(idx, Tensor):
        if idx.dim() != 1 or idx.is_floating_point():
            raise ValueError(f"batch[{INDEX_KEY!r}] must be a 1-d integer tensor, got dtype "
                             f"{idx.dtype}, shape {tuple(idx.shape)}")
        return [int(i) for i in idx.tolist()]
    return [int(i) for i in idx]


class WarmStartCache:
    """LRU store of per-sample warm starts ``index ↦ (x_b, q_b)``.

    ``max_bytes`` / ``max_items`` bound what it holds (``None``: unbounded; ``0`` items: a cache
    that stores nothing); ``device`` where the copies live. ``hits``/``misses``/``evictions``
    count look-ups of ``x`` and dropped entries.
    """

    def __init__(self, max_bytes: Optional[int] = 2 ** 30, max_items: Optional[int] = None,
                 device: Any = "cpu"):
        for name, v in (("max_bytes", max_bytes), ("max_items", max_items)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {v!r}")
        self.max_bytes, self.max_items, self.device = max_bytes, max_items, torch.device(device)
        self._store: "OrderedDict[int, Tuple[Tensor, Optional[Tensor]]]" = OrderedDict()
        self.nbytes = self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._store)

    @staticmethod
    def _size(entry) -> int:
        return sum(t.numel() * t.element_size() for t in entry if t is not None)

    def gather(self, indices: Sequence[int], fallback: Tensor, which: int = 0) -> Tuple[Tensor, int]:
        """``fallback`` (shape ``(B, ...)``) with row ``b`` replaced by the cached ``x``
        (``which=0``) or ``q`` (``which=1``) of ``indices[b]`` where there is one of the same
        shape and dtype; returns ``(tensor, number of rows taken from the cache)``."""
        out, n = fallback.clone(), 0
        for b, i in enumerate(indices):
            entry = self._store.get(i)
            t = None if entry is None else entry[which]
            if t is not None and t.shape == fallback.shape[1:] and t.dtype == fallback.dtype:
                out[b] = t.to(fallback.device)
                n += 1
                self._store.move_to_end(i)
        if which == 0:
            self.hits += n
            self.misses += len(indices) - n
        return out, n

    def put(self, indices: Sequence[int], x: Tensor, q: Optional[Tensor]) -> None:
        """Store rows ``x[b]`` (and ``q[b]``) under ``indices[b]`` (most recent), then evict the
        least recently used entries beyond the bounds."""
        if self.max_items == 0 or self.max_bytes == 0:
            return
        for b, i in enumerate(indices):
            entry = (x[b].detach().to(self.device, copy=True),
                     None if q is None else q[b].detach().to(self.device, copy=True))
            old = self._store.pop(i, None)
            if old is not None:
                self.nbytes -= self._size(old)
            self._store[i] = entry
            self.nbytes += self._size(entry)
        while self._store and ((self.max_items is not None and len(self._store) > self.max_items) or
                               (self.max_bytes is not None and self.nbytes > self.max_bytes)):
            _, old = self._store.popitem(last=False)
            self.nbytes -= self._size(old)
            self.evictions += 1

    def state_dict(self) -> Dict[str, Any]:
        """Contents in LRU order and counters (tensors, ints and lists: ``weights_only`` safe)."""
        empty = torch.empty(0)
        return {"keys": list(self._store), "x": [e[0] for e in self._store.values()],
                "q": [empty if e[1] is None else e[1] for e in self._store.values()],
                "has_q": [e[1] is not None for e in self._store.values()],
                "counts": [self.hits, self.misses, self.evictions]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the same entries, order and counters)."""
        self._store.clear()
        self.nbytes = 0
        for i, x, q, has_q in zip(state["keys"], state["x"], state["q"], state["has_q"]):
            entry = (x.to(self.device), q.to(self.device) if has_q else None)
            self._store[int(i)] = entry
            self.nbytes += self._size(entry)
        self.hits, self.misses, self.evictions = (int(v) for v in state["counts"])
