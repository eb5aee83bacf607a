"""Joseph's interpolation weights: the discretisation behind the ``torch`` backend.

A ray ``p + t d`` (unit direction ``d``) is sampled once per pixel column if it is
closer to horizontal (``|d_x| >= |d_y|``), else once per pixel row. At the sample in
column ``j`` (centre ``x_j``) the ray is at height ``y``; with fractional row index
``r = (h/2 - y)/dy - 1/2``, ``r0 = floor(r)``, ``f = r - r0`` the line integral is
approximated by ::

    (A f)(ray) = sum_j  L * [ (1 - f) * img[r0, j] + f * img[r0 + 1, j] ],   L = dx / |d_x|,

``L`` being the ray length per column step; rows outside the image count as zero.
The row-stepping case swaps the roles of ``x`` and ``y``. Every ray therefore has at
most ``2 * max(H, W)`` non-zero weights, each a product of a linear interpolation
weight and a step length. The same weights give the sparse matrix (built once) and
the matrix-free projector (recomputed on the fly), so both define the same operator
and its transpose.
"""

from __future__ import annotations

import torch

from .geometry import Geometry


def joseph_weights(geometry: Geometry, angle_index, *, device=None, dtype=torch.float64):
    """Pixel indices and weights of the rays of ``angles[angle_index]``.

    Returns
    -------
    index : torch.LongTensor, shape ``(n_a, n_det, S, 2)``
        Flat pixel index ``i * W + j`` (0 where the weight is 0), ``S = max(H, W)``.
    weight : torch.Tensor, shape ``(n_a, n_det, S, 2)``, ``dtype``
        Interpolation weight times step length (length units); 0 outside the image.
    """
    H, W = geometry.image_shape
    h, w = geometry.extent
    dy, dx = geometry.pixel_size
    p, d = geometry.rays(angle_index, device=device, dtype=dtype)  # (n_a, n_det, 2)
    S = max(H, W)
    steps = torch.arange(S, device=device, dtype=dtype)

    px, py = p[..., 0:1], p[..., 1:2]  # (n_a, n_det, 1)
    ux, uy = d[..., 0:1], d[..., 1:2]
    x_step = ux.abs() >= uy.abs()  # sample per column

    # Column-stepping rays: sample at column centres x_j.
    xj = -w / 2 + (steps + 0.5) * dx
    safe_ux = torch.where(x_step, ux, torch.ones_like(ux))
    y_at = py + (xj - px) / safe_ux * uy
    frac_row = (h / 2 - y_at) / dy - 0.5
    # Row-stepping rays: sample at row centres y_i.
    yi = h / 2 - (steps + 0.5) * dy
    safe_uy = torch.where(x_step, torch.ones_like(uy), uy)
    x_at = px + (yi - py) / safe_uy * ux
    frac_col = (x_at + w / 2) / dx - 0.5

    coord = torch.where(x_step, frac_row, frac_col)  # the interpolated coordinate
    base = torch.floor(coord)
    f = coord - base
    base = base.long()
    step_len = torch.where(x_step, dx / ux.abs(), dy / uy.abs())  # (n_a, n_det, 1)
    n_steps = torch.where(x_step, W, H)  # valid step count
    n_interp = torch.where(x_step, H, W)  # size of the interpolated axis
    step_ok = steps.long() < n_steps

    idx = torch.stack([base, base + 1], -1)  # (n_a, n_det, S, 2) along interpolated axis
    wts = torch.stack([1.0 - f, f], -1) * step_len[..., None]
    ok = step_ok[..., None] & (idx >= 0) & (idx < n_interp[..., None])
    s_idx = steps.long()[:, None].expand_as(idx[0, 0])  # (S, 2)
    flat = torch.where(x_step[..., None], idx * W + s_idx, s_idx * W + idx)
    wts = torch.where(ok, wts, torch.zeros((), dtype=dtype, device=device))
    flat = torch.where(ok, flat, torch.zeros((), dtype=torch.long, device=device))
    return flat, wts
