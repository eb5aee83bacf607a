r"""Evaluation of reconstruction methods: the analog of Table 3.1 of the reference.

For every method ``R`` (FBP and trained networks) and every test pair ``(y_n, x_n)``:

- quality: mean PSNR ``10 log10(R_x² / mse)`` and mean SSIM of ``R(y_n)`` against ``x_n``
  (``recon.metrics``; data range of the ground truth);
- speed: inference time per sample, the median over ``repeats`` timed passes of the same
  batch, where the methods are timed *interleaved* (method 1, 2, ..., 1, 2, ...) in one run on
  one device, so that a busy machine disturbs all of them alike.  CUDA timings synchronise
  before and after every pass.

:func:`load_methods` rebuilds geometry and models from ``best.pt`` checkpoints; the command
line is ``python -m recon.train evaluate`` (:mod:`recon.training.cli`).
"""

from __future__ import annotations

import numbers
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..checkpoint import load_checkpoint
from ..io import atomic_write
from .experiment import make_operator

__all__ = ["Method", "LABELS", "evaluate_methods", "time_methods", "format_table",
           "save_samples_png", "load_methods"]

Method = Callable[[torch.Tensor], torch.Tensor]
LABELS = {"fbp": "FBP", "lpd": "LPD", "lspd": "LSPD", "sklspd": "Sk-LSPD"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_methods(methods: Mapping[str, Method], sinogram: torch.Tensor, repeats: int = 10,
                 warmup: int = 2) -> dict[str, float]:
    """Median seconds per sample of ``method(sinogram)`` for each method, timed interleaved.

    Every method runs ``warmup`` untimed passes first; then ``repeats`` rounds each time every
    method once on the whole batch ``sinogram``.  Returns ``{name: median_time / batch}``.
    """
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
            raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
    if not isinstance(sinogram, torch.Tensor) or sinogram.ndim < 1 or len(sinogram) == 0:
        raise ValueError(f"`sinogram` must be a non-empty batch to time, got "
                         f"{tuple(sinogram.shape) if isinstance(sinogram, torch.Tensor) else type(sinogram).__name__}")
    device = sinogram.device
    for fn in methods.values():
        for _ in range(warmup):
            fn(sinogram)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            _sync(device)
            start = time.perf_counter()
            fn(sinogram)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    batch = sinogram.shape[0]
    return {name: statistics.median(t) / batch for name, t in times.items()}


@torch.no_grad()
def evaluate_methods(methods: Mapping[str, Method], data: Mapping[str, torch.Tensor], *,
                     batch_size: int = 16, time_batch: int = 1, repeats: int = 10,
                     device: str | torch.device = "cpu",
                     ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """PSNR / SSIM over ``data`` and timing of every method.

    Args:
        methods: ``{label: callable (B, 1, n_a, n_d) -> (B, 1, H, W)}`` in table order.
        data: ``{"sinogram": (N, 1, n_a, n_d), "image": (N, 1, H, W)}``.
        batch_size: batch size of the quality pass.
        time_batch: samples per timed pass (the first ``time_batch`` test sinograms).
        repeats: timed passes per method (median reported).
        device: where everything runs.

    Returns:
        ``rows``: one dict per method: ``method``, ``psnr``, ``psnr_std``, ``ssim``,
        ``ms_per_sample``, ``n``; and ``outputs``: ``{label: (N, 1, H, W)}`` on the CPU.
    """
    from recon.metrics import psnr, ssim

    for name, value in (("batch_size", batch_size), ("time_batch", time_batch)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    if not isinstance(data, Mapping) or "sinogram" not in data or "image" not in data \
            or len(data["image"]) == 0 or len(data["sinogram"]) != len(data["image"]):
        raise ValueError("`data` must hold 'sinogram' and 'image' with the same number >= 1 of "
                         "samples")
    device = torch.device(device)
    images = data["image"]
    outputs = {}
    rows = []
    for name, fn in methods.items():
        recon = torch.cat([fn(data["sinogram"][s:s + batch_size].to(device)).cpu()
                           for s in range(0, len(images), batch_size)])
        outputs[name] = recon
        p, s = psnr(recon, images), ssim(recon, images)  # per image, data range of the truth
        rows.append({"method": name, "psnr": float(p.mean()), "psnr_std": float(p.std()),
                     "ssim": float(s.mean()), "n": int(len(images))})
    timing = time_methods(methods, data["sinogram"][:time_batch].to(device), repeats)
    for row in rows:
        row["ms_per_sample"] = 1e3 * timing[row["method"]]
    return rows, outputs


def format_table(rows: Sequence[Mapping[str, Any]], reference: str | None = None) -> str:
    """Plain-text table ``Method | PSNR | SSIM | ms/sample | time ratio`` (ratio to ``reference``)."""
    ref_time = next((r["ms_per_sample"] for r in rows if r["method"] == reference), None)
    lines = [f"{'Method':<10}{'PSNR (dB)':>12}{'SSIM':>9}{'ms/sample':>12}"
             + (f"{'time/' + reference:>12}" if ref_time else "")]
    for r in rows:
        line = f"{r['method']:<10}{r['psnr']:>12.2f}{r['ssim']:>9.4f}{r['ms_per_sample']:>12.3f}"
        if ref_time:
            line += f"{r['ms_per_sample'] / ref_time:>12.2f}"
        lines.append(line)
    return "\n".join(lines)


def save_samples_png(path: str | Path, image: torch.Tensor, outputs: Mapping[str, torch.Tensor],
                     n_samples: int = 3) -> Path:
    """Save a grid: one row per sample, columns ground truth then every method (with PSNR)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recon.metrics import psnr

    n = min(n_samples, len(image))
    cols = 1 + len(outputs)
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n), squeeze=False)
    for i in range(n):
        ref = image[i, 0]
        vmin, vmax = float(ref.min()), float(ref.max())
        panels = [("Ground truth", ref, None)] + [
            (name, out[i, 0], float(psnr(out[i:i + 1], image[i:i + 1])[0]))
            for name, out in outputs.items()]
        for ax, (title, img, value) in zip(axes[i], panels):
            ax.imshow(img.float().numpy(), cmap="gray", vmin=vmin, vmax=vmax)
            ax.set_title(title if value is None else f"{title}\n{value:.2f} dB", fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_write(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path


def load_methods(checkpoints: Sequence[str | Path], device: str | torch.device = "cpu",
                 ) -> tuple[dict[str, Any], Any, dict[str, Method]]:
    """Rebuild ``(setup, operator, methods)`` from ``best.pt`` checkpoints of ``train``.

    ``methods`` maps ``"FBP"`` (with the setup's filter) and one label per checkpoint
    (``"LPD"``, ``"LSPD"``, ``"Sk-LSPD"``) to callables in eval mode on ``device``.  All
    checkpoints must share the acquisition (geometry, data set, noise), else ``ValueError``.
    """
    from ..models import MODELS

    device = torch.device(device)
    states = [load_checkpoint(p) for p in checkpoints]
    metas = [s.get("metadata") or {} for s in states]
    for path, meta in zip(checkpoints, metas):
        if "model_name" not in meta or "setup" not in meta:
            raise ValueError(f"checkpoint {str(path)!r} has no training metadata (model_name, "
                             f"setup); was it written by `python -m recon.train train`?")
    setup = metas[0]["setup"]
    for path, meta in zip(checkpoints[1:], metas[1:]):
        if _acquisition(meta["setup"]) != _acquisition(setup):
            raise ValueError(f"checkpoint {str(path)!r} was trained on acquisition "
                             f"{_acquisition(meta['setup'])}, but {str(checkpoints[0])!r} on "
                             f"{_acquisition(setup)}; evaluate them separately")
    operator = make_operator(setup)
    methods: dict[str, Method] = {"FBP": _fbp_method(operator, setup.get("fbp_filter", "ram-lak"))}
    for state, meta in zip(states, metas):
        model = MODELS[meta["model_name"]](operator, **meta["model_config"])
        model.load_state_dict(state["model"])
        model.to(device).eval()
        label = LABELS.get(meta["model_name"], meta["model_name"])
        while label in methods:
            label += "'"
        methods[label] = model
    return setup, operator, methods


def _acquisition(setup: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in setup.items() if k not in ("n_train", "n_val", "n_test")}


def _fbp_method(operator, filter_name: str) -> Method:
    from recon.operators import fbp

    return lambda y: fbp(y, operator, filter=filter_name)
