r"""Learned primal-dual unrolling for CT: LPD, LSPD and sketched LSPD as one family.

All three networks unroll ``K`` iterations of the primal-dual hybrid gradient method for
``min_x f(Ax) + g(x)`` and replace its proximal maps by small residual CNNs (Adler & Öktem 2018;
Tang et al. 2022).  With primal memory ``x_k`` (``n_primal`` channels, channel 0 is the image)
and dual memory ``h_k`` (``n_dual`` channels, channel 0 is the dual variable), iteration ``k``
uses one angle subset ``i = i_k`` of ``m`` (sub-sampling ``S_i``; data ``y_i = S_i y``) and an
operator ``A_{s_k}`` that is either the full-resolution ``A`` or its coarse-grid sketch:

.. math::

    h_{k+1} &= h_k + D_k\bigl(h_k,\ \sigma_k \bar{A}_i \tilde{x}_k,\ \sigma_k \bar{y}_i\bigr)
    \\
    x_{k+1} &= \tilde{x}_k + P_k\bigl(\tilde{x}_k,\
        \tau_k\, m\, \rho_k\, \bar{A}_i^{\top} h_{k+1}^{(0)}\bigr)

with ``Ā = A / ‖A‖`` and ``ȳ = y / ‖A‖`` (normalised once with the power-method norm, so the
inputs of every block are O(1) whatever the units of the projector), trainable step sizes
``σ_k, τ_k``, and ``x̃_k`` the primal state on the grid of layer ``k``.

- :class:`LearnedPrimalDual`: ``m = 1`` and every layer unsketched (``ρ_k = 1``).
- :class:`LSPD`: ``m`` angle subsets ``A_i = S_i A`` (angles ``i::m``), one per layer in cyclic
  order ``i_k = k mod m`` or uniformly at random; the dual memory lives in subset data space
  (``p/m`` rows).  The factor ``m`` makes ``m A_iᵀ h`` an unbiased estimate of the full
  backprojection, so block inputs keep their scale; with ``m = 1`` the computation is exactly
  that of :class:`LearnedPrimalDual`.
- :class:`SketchedLSPD` ("option 2" of Tang et al.): the first ``K - n_unsketched`` layers run
  the primal state on a grid coarser by ``sketch_factor`` with the coarse operator
  ``A_s = A.coarsen(f)`` (bilinear down-sampling ``S`` before the first layer, bilinear
  up-sampling ``U`` after the last sketched one); ``ρ_k = |Ω_s|/|Ω| ≈ 1/f²`` rescales the coarse
  backprojection so ``ρ A_sᵀ h ≈ S(Aᵀ h)``.  By default the phase returns
  ``x_fine + U(x̃_end - S x_fine)``: the sketched layers compute a coarse *update* and the fine
  detail of the initial guess survives (``sketch_residual=False``: literally ``U(x̃_end)``, which
  blurs the FBP input).  With no sketched layer it is :class:`LSPD`.

The step sizes enter as scalings of the normalised operator outputs, as ``σ`` and ``τ`` do in
PDHG (``prox_{σf*}(h + σ(Ax - y))`` and ``x - τ Aᵀ h``).  ``σ = τ = 1`` on ``Ā`` equals
``σ = τ = 1/‖A‖`` on ``A``, the classical admissible choice ``στ‖A‖² ≤ 1``; the reference's
``0.01`` plays the same role for its un-normalised projector and is available as ``step_init``.

When the number of angles is not divisible by ``m``, subset data and dual memory are zero-padded
to ``ceil(p/m)`` rows (the padding never reaches the backprojection).

Operators follow :class:`recon.operators.LinearOperator` (``op(x)``, ``op.adjoint(y)``,
``op.domain_shape``, ``op.range_shape``; check with :func:`recon.operators.adjointness_test`)
and also provide ``op.subset(i, m)``, ``op.coarsen(f)`` and ``op.norm()``; tensors are
``(B, 1, H, W)`` images and ``(B, 1, n_angles, n_det)`` sinograms.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ResidualConvBlock

__all__ = ["UnrolledPrimalDual", "LearnedPrimalDual", "LSPD", "SketchedLSPD",
           "MODELS", "build_model"]

_INITS = ("fbp", "zero")
_ORDERS = ("cyclic", "random")


class UnrolledPrimalDual(nn.Module):
    r"""The general unrolled primal-dual network (see the module docstring for the iteration).

    Args:
        operator: ray transform ``A`` (``RayTransform`` protocol).
        n_iterations: number of unrolled iterations ``K``.
        n_primal: primal memory channels (``x_0`` is replicated into all of them).
        n_dual: dual memory channels (``h_0 = 0``).
        hidden_channels: width of the hidden layers of every block.
        kernel_size: odd convolution kernel size (3 for digits, 5 for clinical slices).
        step_init: initial value of every ``σ_k`` and ``τ_k`` (on the normalised operator).
        init: initial guess ``x_0`` when ``forward`` gets none: ``"fbp"`` (filtered
            backprojection ``recon.operators.fbp`` with ``fbp_filter``) or ``"zero"``.
        fbp_filter: filter name passed to ``recon.operators.fbp``.
        n_subsets: number ``m`` of angle subsets (``1``: full operator every layer).
        subset_order: ``"cyclic"`` (``i_k = k mod m``) or ``"random"`` (uniform draw per layer
            and forward pass in training mode; a fixed draw from ``seed`` in eval mode).
        sketch_factor: integer grid coarsening ``f`` of the sketched layers.
        n_sketched: number of leading layers on the coarse grid (``0 ≤ n_sketched ≤ K``).
        sketch_hidden_channels: hidden width of the blocks of the sketched layers (``None``:
            ``hidden_channels``); a narrower width makes the cheap coarse phase cheaper still.
        sketch_residual: leave the coarse phase by ``x_fine + U(x̃ - S x_fine)`` (the coarse
            layers update only what the coarse grid resolves; the fine detail of the state
            entering the phase is kept) instead of the literal option-2 ``U(x̃)``.
        operator_norm: ``‖A‖`` if known; by default ``operator.norm()`` (power method).
        zero_last: zero-initialise the last convolution of every block (the default): the
            untrained network returns its initial guess (the FBP) and training improves on it;
            ``False`` leaves them random, which starts several dB below the FBP (measured: 13.5
            against 23.0 dB for 32² ellipses, still under the FBP after 3 epochs at lr 5e-5).
        seed: seed of the eval-mode random subset order.
    """

    name = "unrolled"

    def __init__(self, operator: Any, n_iterations: int = 10, *, n_primal: int = 5,
                 n_dual: int = 5, hidden_channels: int = 32, kernel_size: int = 3,
                 step_init: float = 1.0, init: str = "fbp", fbp_filter: str = "ram-lak",
                 n_subsets: int = 1, subset_order: str = "cyclic", sketch_factor: int = 1,
                 n_sketched: int = 0, sketch_residual: bool = True,
                 sketch_hidden_channels: int | None = None, operator_norm: float | None = None,
                 zero_last: bool = True, seed: int = 0):
        super().__init__()
        n_angles = int(operator.range_shape[0])
        _check_int("n_iterations", n_iterations, 1)
        _check_int("n_primal", n_primal, 1)
        _check_int("n_dual", n_dual, 1)
        _check_int("n_subsets", n_subsets, 1, n_angles)
        _check_int("sketch_factor", sketch_factor, 1)
        _check_int("n_sketched", n_sketched, 0, n_iterations)
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if subset_order not in _ORDERS:
            raise ValueError(f"subset_order must be one of {_ORDERS}, got {subset_order!r}")
        if sketch_hidden_channels is not None:
            _check_int("sketch_hidden_channels", sketch_hidden_channels, 1)
        if n_sketched > 0 and sketch_factor == 1:
            raise ValueError(f"n_sketched={n_sketched} needs sketch_factor > 1, got 1")
        self.config = dict(n_iterations=n_iterations, n_primal=n_primal, n_dual=n_dual,
                           hidden_channels=hidden_channels, kernel_size=kernel_size,
                           step_init=step_init, init=init, fbp_filter=fbp_filter,
                           n_subsets=n_subsets, subset_order=subset_order,
                           sketch_factor=sketch_factor, n_sketched=n_sketched,
                           sketch_residual=bool(sketch_residual),
                           sketch_hidden_channels=sketch_hidden_channels, zero_last=zero_last,
                           seed=seed)

        self.operator = operator
        self.image_shape = tuple(int(v) for v in operator.domain_shape)
        self.data_shape = tuple(int(v) for v in operator.range_shape)
        m = n_subsets
        self._fine_ops = [operator] if m == 1 else [operator.subset(i, m) for i in range(m)]
        self._coarse_ops: list[Any] = []
        self.coarse_shape = self.image_shape
        self._coarse_scale = 1.0
        if n_sketched > 0:
            coarse = operator.coarsen(sketch_factor)
            self._coarse_ops = [coarse] if m == 1 else [coarse.subset(i, m) for i in range(m)]
            self.coarse_shape = tuple(int(v) for v in coarse.domain_shape)
            self._coarse_scale = (math.prod(self.coarse_shape) / math.prod(self.image_shape))
        self._rows = [int(op.range_shape[0]) for op in self._fine_ops]
        self._max_rows = max(self._rows)

        norm = float(operator.norm()) if operator_norm is None else float(operator_norm)
        if not math.isfinite(norm) or norm <= 0:
            raise ValueError(f"operator_norm must be finite and > 0, got {norm}")
        self.register_buffer("operator_norm", torch.tensor(norm))
        generator = torch.Generator().manual_seed(int(seed))
        #: subset index of every layer in eval mode (and in training for cyclic order); a
        #: plain list, a function of the config, so reading it never synchronises a GPU
        self.subset_schedule: list[int] = (
            [k % m for k in range(n_iterations)] if subset_order == "cyclic"
            else torch.randint(m, (n_iterations,), generator=generator).tolist())

        self.sigma = nn.Parameter(torch.full((n_iterations,), float(step_init)))
        self.tau = nn.Parameter(torch.full((n_iterations,), float(step_init)))
        widths = [(sketch_hidden_channels or hidden_channels) if k < n_sketched
                  else hidden_channels for k in range(n_iterations)]
        self.dual_blocks = nn.ModuleList(
            ResidualConvBlock(n_dual, 2, w, kernel_size, zero_last) for w in widths)
        self.primal_blocks = nn.ModuleList(
            ResidualConvBlock(n_primal, 1, w, kernel_size, zero_last) for w in widths)

    # ------------------------------------------------------------------ public helpers
    @classmethod
    def default_parameters(cls, preset: str = "digits") -> dict[str, Any]:
        """Constructor keyword arguments of the reference's setups.

        ``"digits"`` (MNIST-like, 28²-64² images): 5 iterations, 3×3 kernels, 32 channels;
        ``"clinical"`` (512² slices): 12 iterations, 5×5 kernels, 32 channels.
        """
        presets = {"digits": dict(n_iterations=5, kernel_size=3, hidden_channels=32),
                   "clinical": dict(n_iterations=12, kernel_size=5, hidden_channels=32)}
        if preset not in presets:
            raise ValueError(f"preset must be one of {tuple(presets)}, got {preset!r}")
        return dict(presets[preset])

    @classmethod
    def from_preset(cls, operator: Any, preset: str = "digits", **overrides: Any):
        """``cls(operator, **{**cls.default_parameters(preset), **overrides})``."""
        return cls(operator, **{**cls.default_parameters(preset), **overrides})

    def get_config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this model with ``type(self)(operator, **config)``."""
        return dict(self.config)

    def initial_guess(self, sinogram: torch.Tensor) -> torch.Tensor:
        """``x_0``: ``fbp(y, A)`` for ``init="fbp"``, zeros for ``init="zero"``."""
        if self.config["init"] == "zero":
            return sinogram.new_zeros((sinogram.shape[0], 1, *self.image_shape))
        from recon.operators import fbp  # the CT physics package; imported lazily
        return fbp(sinogram, self.operator, filter=self.config["fbp_filter"])

    # ------------------------------------------------------------------ forward
    def forward(self, sinogram: torch.Tensor, x0: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct ``(B, 1, H, W)`` images from ``(B, 1, n_angles, n_det)`` sinograms.

        ``x0`` (same shape as the output) overrides the configured initial guess, e.g. a
        precomputed FBP from the data set.
        """
        self._check_input("sinogram", sinogram, self.data_shape)
        if sinogram.shape[0] == 0:  # an empty batch reconstructs to an empty batch
            return sinogram.new_zeros((0, 1) + tuple(self.image_shape))
        if x0 is None:
            x0 = self.initial_guess(sinogram)
        else:
            self._check_input("x0", x0, self.image_shape)
            if x0.shape[0] != sinogram.shape[0]:
                raise ValueError(f"x0 has batch size {x0.shape[0]}, sinogram has "
                                 f"{sinogram.shape[0]}")
        cfg = self.config
        m, n_sketched, n_iter = cfg["n_subsets"], cfg["n_sketched"], cfg["n_iterations"]
        inv_norm = 1.0 / self.operator_norm.to(sinogram.dtype)
        data = [self._pad_rows(sinogram[..., i::m, :] if m > 1 else sinogram) * inv_norm
                for i in range(m)]
        x = x0.repeat(1, cfg["n_primal"], 1, 1)
        h = sinogram.new_zeros((sinogram.shape[0], cfg["n_dual"], self._max_rows,
                                self.data_shape[1]))
        if n_sketched > 0:
            x_fine = x
            x = x_coarse = self._resample(x, self.coarse_shape)
        dtype = sinogram.dtype  # operators run in the data's dtype (also under autocast)
        for k, i in enumerate(self._schedule()):
            if k == n_sketched and n_sketched > 0:
                x = self._refine(x, x_fine, x_coarse)
            sketched = k < n_sketched
            op = self._coarse_ops[i] if sketched else self._fine_ops[i]
            ax = self._pad_rows(op(x[:, :1].to(dtype)))
            h = self.dual_blocks[k](h, ax * (self.sigma[k] * inv_norm), data[i] * self.sigma[k])
            tau = self.tau[k] * (m * inv_norm)
            if sketched:
                tau = tau * self._coarse_scale
            x = self.primal_blocks[k](x, op.adjoint(h[:, :1, :self._rows[i]].to(dtype)) * tau)
        if n_sketched == n_iter:
            x = self._refine(x, x_fine, x_coarse)
        return x[:, :1]

    # ------------------------------------------------------------------ internals
    def _schedule(self) -> list[int]:
        m = self.config["n_subsets"]
        if self.training and self.config["subset_order"] == "random" and m > 1:
            return torch.randint(m, (self.config["n_iterations"],)).tolist()
        return self.subset_schedule

    def _pad_rows(self, t: torch.Tensor) -> torch.Tensor:
        missing = self._max_rows - t.shape[-2]
        return F.pad(t, (0, 0, 0, missing)) if missing else t

    def _refine(self, x: torch.Tensor, x_fine: torch.Tensor, x_coarse: torch.Tensor):
        """Back to the fine grid: ``x_fine + U(x - S x_fine)`` or, literally, ``U(x)``."""
        if self.config["sketch_residual"]:
            return x_fine + self._resample(x - x_coarse, self.image_shape)
        return self._resample(x, self.image_shape)

    @staticmethod
    def _resample(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(x, size=shape, mode="bilinear", align_corners=False)

    def _check_input(self, name: str, t: torch.Tensor, spatial: tuple[int, int]) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4 or t.shape[1] != 1 or tuple(t.shape[-2:]) != spatial:
            raise ValueError(f"{name} must have shape (B, 1, {spatial[0]}, {spatial[1]}) to match "
                             f"the operator, got {tuple(t.shape)}")
        own = self.sigma.dtype
        if t.dtype != own and {t.dtype, own} <= {torch.float32, torch.float64}:
            raise TypeError(f"{name} is {t.dtype} but the network's weights are {own}: pass "
                            f"{name}.to({own}) or convert the network with model.to({t.dtype})")

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"image_shape={self.image_shape}, data_shape={self.data_shape}, "
                f"n_iterations={cfg['n_iterations']}, n_subsets={cfg['n_subsets']}, "
                f"n_sketched={cfg['n_sketched']}, sketch_factor={cfg['sketch_factor']}")


class LearnedPrimalDual(UnrolledPrimalDual):
    r"""Learned Primal-Dual (Adler & Öktem 2018): full operator in every layer.

    ``h_{k+1} = h_k + D_k(h_k, σ_k Ā x_k, σ_k ȳ)``,
    ``x_{k+1} = x_k + P_k(x_k, τ_k Āᵀ h_{k+1}^{(0)})``, ``k = 0..K-1``; returns ``x_K^{(0)}``.
    ``options`` are the keyword arguments of :class:`UnrolledPrimalDual` except the subset and
    sketch ones.
    """

    name = "lpd"

    def __init__(self, operator: Any, n_iterations: int = 10, **options: Any):
        _forbid(options, n_subsets=1, n_sketched=0, sketch_hidden_channels=None)
        super().__init__(operator, n_iterations, **options)

    def get_config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this model (no subset / sketch options)."""
        return _drop(self.config, "n_subsets", "subset_order", "sketch_factor", "n_sketched",
                     "sketch_residual", "sketch_hidden_channels")


class LSPD(UnrolledPrimalDual):
    r"""Learned Stochastic Primal-Dual (Tang et al. 2022): one angle subset per layer.

    ``i_k = k mod m`` (or uniform), ``h_{k+1} = h_k + D_k(h_k, σ_k S_iĀ x_k, σ_k S_iȳ)``,
    ``x_{k+1} = x_k + P_k(x_k, τ_k m (S_iĀ)ᵀ h_{k+1}^{(0)})``.  ``LSPD(A, K, n_subsets=1)``
    computes exactly ``LearnedPrimalDual(A, K)`` with the same weights.
    """

    name = "lspd"

    @classmethod
    def default_parameters(cls, preset: str = "digits") -> dict[str, Any]:
        """The LPD preset with ``n_subsets=4`` (the reference's split)."""
        return {**super().default_parameters(preset), "n_subsets": 4}

    def __init__(self, operator: Any, n_iterations: int = 10, *, n_subsets: int = 4,
                 subset_order: str = "cyclic", **options: Any):
        _forbid(options, n_sketched=0, sketch_hidden_channels=None)
        super().__init__(operator, n_iterations, n_subsets=n_subsets,
                         subset_order=subset_order, **options)

    def get_config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this model (no sketch options)."""
        return _drop(self.config, "sketch_factor", "n_sketched", "sketch_residual",
                     "sketch_hidden_channels")


class SketchedLSPD(UnrolledPrimalDual):
    r"""Sketched LSPD, option 2 of Tang et al. (2022): coarse-to-fine unrolling.

    Layers ``k < K - n_unsketched`` run on the grid coarsened by ``sketch_factor`` with
    ``A_s = A.coarsen(sketch_factor)``:
    ``h_{k+1} = h_k + D_k(h_k, σ_k S_iĀ_s x̃_k, σ_k S_iȳ)``,
    ``x̃_{k+1} = x̃_k + P_k(x̃_k, τ_k m ρ (S_iĀ_s)ᵀ h_{k+1}^{(0)})`` with ``x̃_0 = S(x_0)``
    (bilinear) and ``ρ = |Ω_s|/|Ω|``; the state returns to the fine grid once, as
    ``x_0 + U(x̃ - S x_0)`` (``sketch_residual=True``) or ``U(x̃)``, and the last
    ``n_unsketched`` layers are plain LSPD layers.  ``n_unsketched = n_iterations`` gives LSPD;
    the default ``None`` leaves a third of the layers unsketched (``round(K/3)``, at least 1:
    4 of 12, 2 of 5).
    """

    name = "sklspd"

    @classmethod
    def default_parameters(cls, preset: str = "digits") -> dict[str, Any]:
        """LSPD preset, factor-2 sketch, last 2 of 5 (digits) or 4 of 12 (clinical) unsketched."""
        params = {**super().default_parameters(preset), "n_subsets": 4, "sketch_factor": 2}
        params["n_unsketched"] = 2 if preset == "digits" else 4
        return params

    def __init__(self, operator: Any, n_iterations: int = 12, *, n_subsets: int = 4,
                 subset_order: str = "cyclic", sketch_factor: int = 2,
                 n_unsketched: int | None = None, sketch_residual: bool = True, **options: Any):
        _forbid(options, n_sketched=None)
        _check_int("n_iterations", n_iterations, 1)
        if n_unsketched is None:
            n_unsketched = max(1, round(n_iterations / 3))
        _check_int("n_unsketched", n_unsketched, 0, n_iterations)
        super().__init__(operator, n_iterations, n_subsets=n_subsets,
                         subset_order=subset_order, sketch_factor=sketch_factor,
                         n_sketched=n_iterations - n_unsketched,
                         sketch_residual=sketch_residual, **options)

    def get_config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this model (``n_unsketched`` for ``n_sketched``)."""
        config = _drop(self.config, "n_sketched")
        config["n_unsketched"] = self.config["n_iterations"] - self.config["n_sketched"]
        return config


MODELS: dict[str, type[UnrolledPrimalDual]] = {
    "lpd": LearnedPrimalDual, "lspd": LSPD, "sklspd": SketchedLSPD}


def build_model(name: str, operator: Any, preset: str | None = None,
                **overrides: Any) -> UnrolledPrimalDual:
    """Build ``MODELS[name]`` (``"lpd"``, ``"lspd"``, ``"sklspd"``) on ``operator``.

    With ``preset`` (``"digits"`` or ``"clinical"``) the preset's parameters are the defaults;
    ``overrides`` win over them.
    """
    if name not in MODELS:
        raise ValueError(f"model name must be one of {tuple(MODELS)}, got {name!r}")
    cls = MODELS[name]
    params = cls.default_parameters(preset) if preset is not None else {}
    return cls(operator, **{**params, **overrides})


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _forbid(options: dict[str, Any], **allowed: Any) -> None:
    """Reject core options that the subclass fixes (``allowed`` maps them to the only value)."""
    for key, value in allowed.items():
        if key in options and options[key] != value:
            raise ValueError(f"{key}={options[key]!r} is not an option of this model")
        options.pop(key, None)


def _drop(config: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in keys}
