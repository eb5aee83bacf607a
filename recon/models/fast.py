r"""Fast inference and training steps of the unrolled networks: channels-last, bf16 autocast,
``torch.compile`` and CUDA graphs as options of one wrapper each.

:class:`FastInference` computes ``x̂ = R_θ(y)`` (``model(sinogram, x0)`` without gradients);
:class:`FastTrainStep` one optimisation step

.. math::

    \ell = \mathrm{loss}(R_θ(y), x), \qquad θ \leftarrow \mathrm{step}(θ, \nabla_θ \ell).

Options (all off by default, when the plain eager fp32 computation is run):

``precision="bf16"``
    ``torch.autocast(device, bfloat16)``: convolutions in bf16, everything autocast keeps in
    fp32 (and the ray transform, which the networks call in the data's dtype) in fp32. On
    the 2- to 3-iteration test networks (16², CPU) the output differs from fp32 by a
    relative L2 error ``||x_bf16 - x_fp32|| / ||x_fp32||`` of 0.6-1.2e-3 (bf16 keeps 8
    mantissa bits); :data:`BF16_RTOL` ``= 1e-2`` is the tolerance the tests hold it to.
``channels_last=True``
    the model's weights in ``torch.channels_last`` (NHWC) memory format, which cuDNN's
    tensor-core convolutions prefer; numbers equal fp32 to rounding.
``compile=True``
    ``torch.compile(model, mode=compile_mode)``; if compiling fails on the first call (no
    compiler, unsupported op) a ``UserWarning`` says why and the model runs eagerly.
``cuda_graph=True``
    the whole pass (FBP initial guess, all iterations, and for training also the backward
    and the optimizer step) recorded once per input shape in a ``torch.cuda.CUDAGraph`` and
    replayed. Needs the model on a CUDA device and an operator built with
    ``check_finite=False`` (the finiteness check synchronises, which a graph cannot record).

The model is used as it is (train/eval mode and device are the caller's); ``channels_last``
converts it in place.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FastInference", "FastTrainStep", "PRECISIONS", "BF16_RTOL"]

PRECISIONS = ("fp32", "bf16")
#: Relative L2 error of bf16-autocast outputs against fp32 that the tests accept.
BF16_RTOL = 1e-2


class _Options:
    """Validated options shared by :class:`FastInference` and :class:`FastTrainStep`."""

    def __init__(self, model, precision, channels_last, compile, cuda_graph, compile_mode,
                 warmup):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if precision not in PRECISIONS:
            raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}")
        for name, value in (("channels_last", channels_last), ("compile", compile),
                            ("cuda_graph", cuda_graph)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be a bool, got {value!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"`warmup` must be an int >= 1, got {warmup!r}")
        self.device = _model_device(model)
        if cuda_graph:
            _check_graphable(model, self.device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.model, self.precision, self.cuda_graph, self.warmup = model, precision, cuda_graph, warmup
        self.channels_last, self.compile, self.compile_mode = channels_last, compile, compile_mode
        self.fn: Callable = torch.compile(model, mode=compile_mode) if compile else model
        self._compiled_ok = not compile

    def autocast(self):
        """The autocast context of ``precision`` (no cache, so CUDA graphs can record it)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def call(self, *args) -> torch.Tensor:
        """``fn(*args)``; a failing first compiled call warns and falls back to eager."""
        if self._compiled_ok:
            return self.fn(*args)
        try:
            out = self.fn(*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly instead
            warnings.warn(f"torch.compile of {type(self.model).__name__} failed "
                          f"({type(exc).__name__}: {str(exc)[:200]}); running it eagerly",
                          stacklevel=3)
            self.fn = self.model
            out = self.fn(*args)
        self._compiled_ok = True
        return out


def _model_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _check_graphable(model: nn.Module, device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"`cuda_graph`=True needs the model on a CUDA device, got {device}; "
                         "move it with model.cuda() or leave cuda_graph=False")
    operator = getattr(model, "operator", None)
    if getattr(operator, "check_finite", False):
        raise ValueError("`cuda_graph`=True needs an operator built with check_finite=False "
                         "(its finiteness check synchronises the device, which a CUDA graph "
                         "cannot record)")


class _Graph:
    """One recorded CUDA graph with its static inputs and outputs."""

    def __init__(self, body: Callable, inputs: tuple, warmup: int,
                 before_capture: Callable[[], None] | None = None):
        self.inputs = tuple(None if t is None else t.clone() for t in inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                body(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        if before_capture is not None:
            before_capture()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = body(*self.inputs)

    def __call__(self, *inputs) -> torch.Tensor:
        for static, t in zip(self.inputs, inputs):
            if static is not None:
                static.copy_(t)
        self.graph.replay()
        return self.output.clone()


def _key(*tensors) -> tuple:
    return tuple(None if t is None else (tuple(t.shape), t.dtype, str(t.device)) for t in tensors)


class FastInference:
    """``model(sinogram, x0)`` without gradients, with the options of the module docstring.

    Args:
        model: an unrolled network (or any module ``forward(sinogram, x0=None)``).
        precision: ``"fp32"`` or ``"bf16"`` (autocast).
        channels_last: convert the model to channels-last memory format (in place).
        compile: wrap it in ``torch.compile`` (``compile_mode`` passed on).
        cuda_graph: record and replay one CUDA graph per input shape.
        warmup: eager passes before recording a graph (on a side stream, as CUDA needs).

    Calling returns a fresh ``(B, 1, H, W)`` tensor in the sinogram's dtype.
    """

    def __init__(self, model: nn.Module, *, precision: str = "fp32", channels_last: bool = False,
                 compile: bool = False, cuda_graph: bool = False, compile_mode: str | None = None,
                 warmup: int = 2):
        self.options = _Options(model, precision, channels_last, compile, cuda_graph,
                                compile_mode, warmup)
        self._graphs: dict = {}

    def _run(self, sinogram: torch.Tensor, x0: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad(), self.options.autocast():
            out = self.options.call(sinogram, x0)
        return out.to(sinogram.dtype)

    def __call__(self, sinogram: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct ``(B, 1, H, W)`` images from ``(B, 1, n_angles, n_det)`` sinograms."""
        if not self.options.cuda_graph:
            return self._run(sinogram, x0)
        key = _key(sinogram, x0)
        if key not in self._graphs:
            self._graphs[key] = _Graph(self._run, (sinogram, x0), self.options.warmup)
        return self._graphs[key](sinogram, x0)


class FastTrainStep:
    r"""One optimisation step with the options of the module docstring.

    ``step(sinogram, target, x0=None)`` sets the gradients to ``None``, computes
    ``loss = loss_fn(model(sinogram, x0), target)`` (under autocast for ``"bf16"``; the loss
    itself in fp32), back-propagates, calls ``optimizer.step()`` and returns the detached loss.

    Args:
        model: the network (in the mode it should train in).
        optimizer: a ``torch.optim.Optimizer`` over its parameters; with ``cuda_graph`` one
            that can be recorded (Adam/AdamW/SGD-like: built with ``capturable=True`` where
            the optimizer has that option).
        loss_fn: ``(output, target) -> scalar``, default mean squared error.
        precision, channels_last, compile, cuda_graph, compile_mode: as :class:`FastInference`.
        warmup: eager steps before recording a graph. They run on the first batch; afterwards
            the parameters, buffers and optimizer state are put back as they were (state the
            optimizer created during the warm-up is zeroed, i.e. fresh for Adam-type moments and
            step counts), so the first recorded step is the first real one.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.mse_loss, *,
                 precision: str = "fp32", channels_last: bool = False, compile: bool = False,
                 cuda_graph: bool = False, compile_mode: str | None = None, warmup: int = 3):
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
        if cuda_graph:
            _check_recordable(model, optimizer)
        self.options = _Options(model, precision, channels_last, compile, cuda_graph,
                                compile_mode, warmup)
        self.optimizer, self.loss_fn = optimizer, loss_fn
        self._graphs: dict = {}

    def _body(self, sinogram, target, x0) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.options.autocast():
            out = self.options.call(sinogram, x0)
        loss = self.loss_fn(out.float(), target.float())
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, sinogram: torch.Tensor, target: torch.Tensor,
                 x0: torch.Tensor | None = None) -> torch.Tensor:
        """One step on the batch; returns the loss before the update (a 0-d tensor)."""
        if not self.options.cuda_graph:
            return self._body(sinogram, target, x0)
        key = _key(sinogram, target, x0)
        if key not in self._graphs:
            saved = _snapshot(self.options.model, self.optimizer)
            self._graphs[key] = _Graph(self._body, (sinogram, target, x0), self.options.warmup,
                                       before_capture=lambda: _restore(saved, self.optimizer))
        return self._graphs[key](sinogram, target, x0)


def _check_recordable(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if "capturable" in optimizer.defaults and not all(
            group.get("capturable") for group in optimizer.param_groups):
        raise ValueError(f"`cuda_graph`=True needs {type(optimizer).__name__}(..., "
                         "capturable=True): its step must run on the device without "
                         "host synchronisation")
    config = getattr(model, "config", {})
    if model.training and config.get("subset_order") == "random" and config.get("n_subsets", 1) > 1:
        raise ValueError("`cuda_graph`=True would freeze the random subset order of training "
                         "mode at the recorded draw; use subset_order='cyclic' or "
                         "cuda_graph=False")


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    tensors = [t for t in list(model.parameters()) + list(model.buffers())]
    state = {(id(p), k): v.detach().clone() for p, st in optimizer.state.items()
             for k, v in st.items() if isinstance(v, torch.Tensor)}
    return {"tensors": [(t, t.detach().clone()) for t in tensors], "state": state}


def _restore(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    """Put parameters, buffers and optimizer state back in place (new state zeroed)."""
    with torch.no_grad():
        for t, value in saved["tensors"]:
            t.copy_(value)
        for p, st in optimizer.state.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    old = saved["state"].get((id(p), k))
                    v.copy_(old) if old is not None else v.zero_()
