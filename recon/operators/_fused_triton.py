r"""Triton kernels of the ``fused`` projector (imported only when they are used).

Both kernels run one program per ``(detector block, angle, batch block)`` and march the
``BLOCK_D`` rays of the tile through the steps ``s`` of their common range (the union of
the rays' ``[lo, hi)``, precomputed per block on the host); at each step they evaluate
``c = c0 + s c1`` (in float64, whatever the data's dtype), ``i = floor(c)``, ``f = c - i``
once per ray and use them for all ``BLOCK_B`` slices of the batch block:

* :func:`_project`: ``out[b, r] = L_r * sum_s ((1 - f) src[b, i, s] + f src[b, i + 1, s])``
  (gather);
* :func:`_backproject`: ``dst[b, i, s] += L_r (1 - f) y[b, r]``, ``dst[b, i + 1, s] +=
  L_r f y[b, r]`` (``atomic_add``), the same pairs of index and weight read backwards;
* :func:`_backproject_gather` (parallel beam): one program per (pixel block, batch block);
  for every angle it lists the few detector bins ``k`` whose sample can land on the pixel
  (``c0_k`` is affine in ``k``: ``c0_k = alpha + beta k``, so bins within ``1/|beta|`` of
  ``(t - alpha - s c1)/beta``, widened by one on each side), recomputes each candidate's
  ``c = c0_k + s c1_k`` exactly as the forward does and keeps weight ``L (1 - f)`` when
  ``floor(c)`` is the pixel's index ``t``, ``L f`` when it is ``t - 1``. It therefore sums
  exactly the forward's (index, weight) pairs, without atomics and deterministically.

``src``/``dst`` are two-layer buffers ``(N, 2 H W)`` (image, then its transpose) as in
:mod:`._fused_backend`; column-stepping rays use the transposed layer, so the rays of one
angle read and write neighbouring addresses. The raw functions are decorated by
:func:`kernels` on first use, which also honours ``TRITON_INTERPRET=1`` set at that time
(the kernels call only ``triton.language`` builtins, no ``@triton.jit`` library function,
so they also run in the interpreter when ``triton.language`` was imported without it).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_CACHE: dict = {}


def _project(src, out, c0_ptr, c1_ptr, len_ptr, col_ptr, blo_ptr, bhi_ptr, N, n_det, H, W,
             BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d, angle, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    det = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = det < n_det
    ray = angle * n_det + det
    c0 = tl.load(c0_ptr + ray, mask=dmask, other=0.0)
    c1 = tl.load(c1_ptr + ray, mask=dmask, other=0.0)
    length = tl.load(len_ptr + ray, mask=dmask, other=0.0)
    col = tl.load(col_ptr + ray, mask=dmask, other=0)
    n_steps = tl.where(col != 0, W, H)
    n_interp = tl.where(col != 0, H, W)
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = b < N
    row_base = b.to(tl.int64)[:, None] * (2 * H * W) + (col * (H * W)).to(tl.int64)[None, :]
    acc = tl.full((BLOCK_B, BLOCK_D), 0.0, dtype=length.dtype)
    s_lo = tl.load(blo_ptr + angle * tl.num_programs(0) + pid_d)
    s_hi = tl.load(bhi_ptr + angle * tl.num_programs(0) + pid_d)
    for s in range(s_lo, s_hi):
        coord = c0 + s * c1  # float64: the same pixels as the float64-built matrix
        base = tl.floor(coord)
        f = (coord - base).to(length.dtype)
        i0 = base.to(tl.int32)
        live = dmask & (s < n_steps)
        m0 = live & (i0 >= 0) & (i0 < n_interp)
        m1 = live & (i0 >= -1) & (i0 + 1 < n_interp)
        addr = row_base + (s * n_interp + i0)[None, :]
        v0 = tl.load(src + addr, mask=bmask[:, None] & m0[None, :], other=0.0)
        v1 = tl.load(src + addr + 1, mask=bmask[:, None] & m1[None, :], other=0.0)
        acc += (1.0 - f)[None, :] * v0 + f[None, :] * v1
    acc = acc * length[None, :]
    out_addr = b.to(tl.int64)[:, None] * (n_det * tl.num_programs(1)) + ray[None, :]
    tl.store(out + out_addr, acc, mask=bmask[:, None] & dmask[None, :])


def _backproject(y, dst, c0_ptr, c1_ptr, len_ptr, col_ptr, blo_ptr, bhi_ptr, N, n_det, H, W,
                 BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d, angle, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    det = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = det < n_det
    ray = angle * n_det + det
    c0 = tl.load(c0_ptr + ray, mask=dmask, other=0.0)
    c1 = tl.load(c1_ptr + ray, mask=dmask, other=0.0)
    length = tl.load(len_ptr + ray, mask=dmask, other=0.0)
    col = tl.load(col_ptr + ray, mask=dmask, other=0)
    n_steps = tl.where(col != 0, W, H)
    n_interp = tl.where(col != 0, H, W)
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = b < N
    tile = bmask[:, None] & dmask[None, :]
    y_addr = b.to(tl.int64)[:, None] * (n_det * tl.num_programs(1)) + ray[None, :]
    g = tl.load(y + y_addr, mask=tile, other=0.0) * length[None, :]
    row_base = b.to(tl.int64)[:, None] * (2 * H * W) + (col * (H * W)).to(tl.int64)[None, :]
    s_lo = tl.load(blo_ptr + angle * tl.num_programs(0) + pid_d)
    s_hi = tl.load(bhi_ptr + angle * tl.num_programs(0) + pid_d)
    for s in range(s_lo, s_hi):
        coord = c0 + s * c1  # float64: the same pixels as the float64-built matrix
        base = tl.floor(coord)
        f = (coord - base).to(length.dtype)
        i0 = base.to(tl.int32)
        live = dmask & (s < n_steps)
        m0 = live & (i0 >= 0) & (i0 < n_interp)
        m1 = live & (i0 >= -1) & (i0 + 1 < n_interp)
        addr = row_base + (s * n_interp + i0)[None, :]
        tl.atomic_add(dst + addr, (1.0 - f)[None, :] * g, mask=bmask[:, None] & m0[None, :],
                      sem="relaxed")
        tl.atomic_add(dst + addr + 1, f[None, :] * g, mask=bmask[:, None] & m1[None, :],
                      sem="relaxed")


def _backproject_gather(y, out, c0_ptr, c1_ptr, len_ptr, alpha_ptr, beta_ptr, slope_ptr,
                        col_ptr, N, n_angles, n_det, H, W, BLOCK_B: tl.constexpr,
                        BLOCK_P: tl.constexpr, NCAND: tl.constexpr):
    pid_p, pid_b = tl.program_id(0), tl.program_id(1)
    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pix < H * W
    row, column = pix // W, pix % W
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = b < N
    y_base = b.to(tl.int64)[:, None] * (n_angles * n_det)
    acc = tl.full((BLOCK_B, BLOCK_P), 0.0, dtype=y.dtype.element_ty)
    for a in range(0, n_angles):
        alpha = tl.load(alpha_ptr + a)
        beta = tl.load(beta_ptr + a)
        slope = tl.load(slope_ptr + a)
        col = tl.load(col_ptr + a)
        step = tl.where(col != 0, column, row)  # the ray's step index at this pixel
        target = tl.where(col != 0, row, column)  # the pixel's index on the interpolated axis
        centre = (target - alpha - step * slope) / beta  # detector k whose sample hits it
        k_lo = tl.floor(centre - 1.0 / tl.abs(beta)).to(tl.int32) - 1
        for m in tl.static_range(NCAND):
            k = k_lo + m
            ok = pmask & (k >= 0) & (k < n_det)
            ray = a * n_det + k
            c0 = tl.load(c0_ptr + ray, mask=ok, other=0.0)
            c1 = tl.load(c1_ptr + ray, mask=ok, other=0.0)
            length = tl.load(len_ptr + ray, mask=ok, other=0.0)
            coord = c0 + step * c1  # exactly the forward kernel's sample position
            base = tl.floor(coord)
            f = (coord - base).to(length.dtype)
            i0 = base.to(tl.int32)
            w = tl.where(i0 == target, 1.0 - f, tl.where(i0 + 1 == target, f, 0.0))
            w = tl.where(ok, w * length, 0.0)
            g = tl.load(y + y_base + ray[None, :], mask=bmask[:, None] & ok[None, :], other=0.0)
            acc += w[None, :] * g
    out_addr = b.to(tl.int64)[:, None] * (H * W) + pix[None, :]
    tl.store(out + out_addr, acc, mask=bmask[:, None] & pmask[None, :])


def kernels() -> tuple:
    """``(project, backproject, backproject_gather)`` as Triton kernels (interpreted under
    ``TRITON_INTERPRET=1``)."""
    key = os.environ.get("TRITON_INTERPRET", "0")
    if key not in _CACHE:
        _CACHE[key] = (triton.jit(_project), triton.jit(_backproject),
                       triton.jit(_backproject_gather))
    return _CACHE[key]


def _grid(n_det: int, n_angles: int, n: int, block_b: int, block_d: int) -> tuple:
    return (triton.cdiv(n_det, block_d), n_angles, triton.cdiv(n, block_b))


def _blocks(n: int, block_d: int) -> tuple[int, int]:
    """``(BLOCK_B, BLOCK_D)``: up to 8 slices per program (powers of two)."""
    return min(8, triton.next_power_of_2(max(1, n))), block_d


# The launches are custom operators, so torch.compile sees each as one opaque op (with the
# output shape from the fake implementation) instead of tracing into Triton's launcher.
@torch.library.custom_op("recon::fused_joseph_project", mutates_args=())
def project_op(src: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, length: torch.Tensor,
               column: torch.Tensor, blo: torch.Tensor, bhi: torch.Tensor, H: int, W: int,
               n_angles: int, n_det: int, block_d: int) -> torch.Tensor:
    """``(N, 2 H W)`` two-layer images -> ``(N, n_angles, n_det)`` sinograms (forward kernel)."""
    n = src.shape[0]
    out = src.new_empty((n, n_angles, n_det))
    bb, bd = _blocks(n, block_d)
    kernels()[0][_grid(n_det, n_angles, n, bb, bd)](
        src, out, c0, c1, length, column, blo, bhi, n, n_det, H, W, BLOCK_B=bb, BLOCK_D=bd)
    return out


@project_op.register_fake
def _(src, c0, c1, length, column, blo, bhi, H, W, n_angles, n_det, block_d):
    return src.new_empty((src.shape[0], n_angles, n_det))


@torch.library.custom_op("recon::fused_joseph_backproject", mutates_args=())
def backproject_op(y: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, length: torch.Tensor,
                   column: torch.Tensor, blo: torch.Tensor, bhi: torch.Tensor, H: int, W: int,
                   block_d: int) -> torch.Tensor:
    """``(N, n_angles, n_det)`` sinograms -> ``(N, 2 H W)`` two-layer back projections."""
    n, n_angles, n_det = y.shape
    dst = y.new_zeros((n, 2 * H * W))
    bb, bd = _blocks(n, block_d)
    kernels()[1][_grid(n_det, n_angles, n, bb, bd)](
        y, dst, c0, c1, length, column, blo, bhi, n, n_det, H, W, BLOCK_B=bb, BLOCK_D=bd)
    return dst


@backproject_op.register_fake
def _(y, c0, c1, length, column, blo, bhi, H, W, block_d):
    return y.new_empty((y.shape[0], 2 * H * W))


def project(src: torch.Tensor, tables: tuple, shape, n_angles: int, n_det: int,
            block_d: int = 64) -> torch.Tensor:
    """``(N, 2 H W)`` two-layer images -> ``(N, n_angles, n_det)`` sinograms."""
    return project_op(src, *tables, shape[0], shape[1], n_angles, n_det, block_d)


def backproject(y: torch.Tensor, tables: tuple, shape, block_d: int = 64) -> torch.Tensor:
    """``(N, n_angles, n_det)`` sinograms -> ``(N, 2 H W)`` two-layer back projections."""
    return backproject_op(y.contiguous(), *tables, shape[0], shape[1], block_d)


@torch.library.custom_op("recon::fused_joseph_backproject_gather", mutates_args=())
def backproject_gather_op(y: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor,
                          length: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                          slope: torch.Tensor, col: torch.Tensor, H: int, W: int,
                          n_cand: int, block_p: int) -> torch.Tensor:
    """``(N, n_angles, n_det)`` sinograms -> ``(N, H, W)`` by the pixel-driven gather kernel."""
    n, n_angles, n_det = y.shape
    out = y.new_empty((n, H, W))
    bb = min(8, triton.next_power_of_2(max(1, n)))
    grid = (triton.cdiv(H * W, block_p), triton.cdiv(n, bb))
    kernels()[2][grid](y, out, c0, c1, length, alpha, beta, slope, col, n, n_angles, n_det, H, W,
                       BLOCK_B=bb, BLOCK_P=block_p, NCAND=n_cand)
    return out


@backproject_gather_op.register_fake
def _(y, c0, c1, length, alpha, beta, slope, col, H, W, n_cand, block_p):
    return y.new_empty((y.shape[0], H, W))


def backproject_gather(y: torch.Tensor, tables: tuple, plan: tuple, n_cand: int, shape,
                       block_p: int = 128) -> torch.Tensor:
    """``(N, n_angles, n_det) -> (N, H, W)``; ``tables = (c0, c1, length)``,
    ``plan = (alpha, beta, slope, col)`` per angle (see ``_fused_backend.gather_plan``)."""
    return backproject_gather_op(y.contiguous(), *tables, *plan, shape[0], shape[1], n_cand,
                                 block_p)
