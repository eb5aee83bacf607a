"""The routes of the Table 3.2 analog, each trained and scored the same way.

* ``clean``: ``S_ψ`` on the ground-truth images (the ceiling);
* ``sequential``: ``R_φ`` (LPD) trained on MSE (``C = 0``), then ``S_ψ`` on ``R_φ``'s outputs
  with ``R_φ`` frozen (the floor);
* ``joint_lpd``, ``joint_lspd``, ``joint_sklspd``: ``R_φ`` and ``S_ψ`` trained together on
  ``(1 − C)·MSE + C·(CE + Dice)``, from scratch or (``JointConfig.pretrain_epochs > 0``, the
  protocol of task-adapted reconstruction) from ``R_φ`` pretrained on the MSE and ``S_ψ``
  pretrained on the clean images.

Scores on the test split: Dice of the lesion class per image (``argmax`` of the logits against
the mask, :func:`recon.metrics.dice`), PSNR (dB) and SSIM of ``x̂`` against the ground truth,
training seconds and inference milliseconds per image.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from .losses import JointLoss, check_weight
from .trainer import JointConfig, JointNet, fit_joint

__all__ = ["ROUTES", "default_model_options", "build_reconstructor", "build_segmenter", "run_route",
           "evaluate_net", "predict", "lesion_prior"]

ROUTES = ("clean", "sequential", "joint_lpd", "joint_lspd", "joint_sklspd")
_RECON = {"sequential": "lpd", "joint_lpd": "lpd", "joint_lspd": "lspd", "joint_sklspd": "sklspd"}



def default_model_options(**overrides: Any) -> dict:
    """``recon_channels`` / ``recon_iterations`` of LPD / LSPD / Sk-LSPD (the "digits" preset
    otherwise: 3×3 kernels, LSPD with 4 subsets, Sk-LSPD factor 2 with the last 2 layers
    unsketched), ``unet_channels`` / ``unet_depth`` of the U-Net."""
    options = dict(recon_channels=16, recon_iterations=5, unet_channels=8, unet_depth=3)
    unknown = set(overrides) - set(options)
    if unknown:
        raise ValueError(f"unknown model options {sorted(unknown)}; known: {sorted(options)}")
    options.update(overrides)
    return options


def build_reconstructor(name: str, operator: Any, options: Mapping[str, Any],
                        fbp_filter: str = "hann") -> nn.Module:
    """``recon.models.build_model(name, operator, "digits", ...)`` with the sizes of ``options``
    and random last layers (``zero_last=False``: the joint protocol, as measured for the
    Table 3.2 analog, pretrains them on the MSE first)."""
    from recon.models import build_model

    return build_model(name, operator, "digits", fbp_filter=fbp_filter,
                       hidden_channels=int(options["recon_channels"]),
                       n_iterations=int(options["recon_iterations"]), zero_last=False)


def build_segmenter(options: Mapping[str, Any], lesion_prior: Optional[float] = None) -> nn.Module:
    """Two-class (background, lesion) :class:`recon.models.unet.UNet` on 1-channel images.

    ``lesion_prior`` ``π`` (the lesion fraction of the training masks) sets the output biases to
    ``(0, log(π/(1 − π)))``, so the untrained network predicts the lesion class with probability
    ``π`` everywhere instead of ``1/2``. Lesions are under 1 % of the pixels: from the default
    start the network first learns "background everywhere" (Dice 0) and needs epochs to leave
    that plateau; from the prior start it goes to the lesions at once.
    """
    from recon.models.unet import UNet

    net = UNet(in_channels=1, num_classes=2, base_channels=int(options["unet_channels"]),
               depth=int(options["unet_depth"]))
    if lesion_prior is not None:
        pi = min(max(float(lesion_prior), 1e-4), 0.5)
        with torch.no_grad():
            net.outc.bias.copy_(torch.tensor([0.0, math.log(pi / (1.0 - pi))]))
    return net


def lesion_prior(data: Mapping[str, Tensor]) -> float:
    """Fraction of lesion pixels in ``data["mask"]`` (the prior of :func:`build_segmenter`)."""
    return float(data["mask"].double().mean())


@torch.no_grad()
def predict(net: JointNet, data: Mapping[str, Tensor], batch_size: int = 16) -> dict:
    """``{"x": x̂, "logits": S(x̂)}`` over a split, in eval mode, with inference seconds."""
    net.eval()
    xs, logits, t0 = [], [], time.perf_counter()
    for s in range(0, len(data["sinogram"]), batch_size):
        x, z = net({k: v[s:s + batch_size] for k, v in data.items()})
        xs.append(x)
        logits.append(z)
    seconds = time.perf_counter() - t0
    return {"x": torch.cat(xs), "logits": torch.cat(logits) if logits[0] is not None else None,
            "seconds": seconds}


def evaluate_net(net: JointNet, data: Mapping[str, Tensor]) -> dict:
    """Per-image Dice (lesion), PSNR (dB), SSIM of ``net`` on ``data`` and inference ms/image."""
    from recon.metrics import dice, psnr, ssim

    out = predict(net, data)
    n = len(data["sinogram"])
    res = {"infer_ms": 1e3 * out["seconds"] / n}
    if out["logits"] is not None:
        res["dice"] = dice(out["logits"].argmax(1, keepdim=True).float(), data["mask"])
    if net.reconstructor is not None:
        res["psnr"] = psnr(out["x"], data["image"])
        res["ssim"] = ssim(out["x"], data["image"])
    return res


def _stage(net, loss_fn, data, config, route, out, resume, meta, first, **overrides):
    """One stage of a route in ``out`` (``None``: in memory). With ``resume`` a stage whose
    ``last.pt`` exists continues it (a finished one only reloads its weights); a later stage
    that never started (no ``last.pt``) starts afresh, so a run killed in any stage resumes
    there. The first stage of a route without ``last.pt`` is refused: nothing to resume."""
    resume_here = resume and out is not None and (first or (out / "last.pt").is_file())
    return fit_joint(net, loss_fn, data, config, route, out, resume=resume_here,
                     metadata=meta, **overrides)


def _sub(out: Optional[Path], name: str) -> Optional[Path]:
    return out / name if out is not None else None


def run_route(route: str, operator: Any, train: Mapping[str, Tensor], config: JointConfig,
              options: Mapping[str, Any], C: float = 0.5, out_dir: Optional[str | Path] = None,
              resume: bool = False, fbp_filter: str = "hann",
              reconstructor: Optional[str] = None,
              metadata: Optional[Mapping[str, Any]] = None) -> tuple[JointNet, dict]:
    """Train ``route`` (see the module docstring) with seed ``config.seed``; returns the trained
    :class:`JointNet` and ``{"train_seconds", "history"}``. ``C`` is used by the joint routes;
    ``reconstructor`` (``"lpd"``, ``"lspd"``, ``"sklspd"``) overrides the route's network (e.g.
    a sequential route with LSPD, the ``C = 0`` end of a sweep); ``metadata`` (e.g. the data
    set-up) is saved with every stage and must match on resume.

    Joint routes with ``config.pretrain_epochs > 0`` follow task-adapted reconstruction: stage
    ``pretrain_reconstruct`` trains ``R_φ`` on the MSE, stage ``pretrain_segment`` ``S_ψ`` on the
    clean images (``pretrain_epochs`` each), then stage ``joint`` trains both on
    ``(1 − C)·MSE + C·task`` for ``config.epochs`` at ``config.joint_lr`` (default
    ``config.lr / 10``). Multi-stage routes
    write each stage under its own sub-folder of ``out_dir`` and resume in the stage where they
    stopped."""
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    C = check_weight(C)
    torch.manual_seed(config.seed)
    out = Path(out_dir) if out_dir is not None else None
    meta = {**dict(metadata or {}), "route": route, "C": C, "options": dict(options),
            "reconstructor": reconstructor}
    prior = lesion_prior(train)
    if route == "clean":
        seg = build_segmenter(options, prior)
        net = JointNet(None, seg, input_key="image")
        res = _stage(net, JointLoss(seg, 1.0), train, config, route, out, resume, meta, True)
        return net, {"train_seconds": res.seconds, "history": res.history}
    rec = build_reconstructor(reconstructor or _RECON[route], operator, options, fbp_filter)
    seg = build_segmenter(options, prior)
    if route == "sequential":
        return _sequential(rec, seg, train, config, out, resume, meta)
    if config.pretrain_epochs == 0:
        net = JointNet(rec, seg)
        res = _stage(net, JointLoss(seg, C), train, config, route, out, resume, meta, True)
        return net, {"train_seconds": res.seconds, "history": res.history}
    return _pretrained_joint(route, rec, seg, train, config, C, out, resume, meta)


def _sequential(rec, seg, train, config, out, resume, meta):
    """``R`` on MSE, then ``S`` on ``R``'s (fixed) outputs."""
    r1 = _stage(JointNet(rec, None), JointLoss(None, 0.0), train, config, "sequential/reconstruct",
                _sub(out, "reconstruct"), resume, meta, True)
    rec.requires_grad_(False)
    stage2 = dict(train, recon=predict(JointNet(rec, None), train)["x"])
    r2 = _stage(JointNet(None, seg, input_key="recon"), JointLoss(seg, 1.0), stage2, config,
                "sequential/segment", _sub(out, "segment"), resume, meta, False)
    rec.requires_grad_(True)
    return JointNet(rec, seg), {"train_seconds": r1.seconds + r2.seconds,
                                "history": r1.history + r2.history}


def _pretrained_joint(route, rec, seg, train, config, C, out, resume, meta):
    """Pretrain ``R`` (MSE) and ``S`` (clean images), then train both on the joint loss."""
    pre = {"epochs": config.pretrain_epochs}
    r1 = _stage(JointNet(rec, None), JointLoss(None, 0.0), train, config,
                f"{route}/pretrain_reconstruct", _sub(out, "pretrain_reconstruct"), resume, meta,
                True, **pre)
    r2 = _stage(JointNet(None, seg, input_key="image"), JointLoss(seg, 1.0), train, config,
                f"{route}/pretrain_segment", _sub(out, "pretrain_segment"), resume, meta, False,
                **pre)
    net = JointNet(rec, seg)
    r3 = _stage(net, JointLoss(seg, C), train, config, f"{route}/joint", _sub(out, "joint"),
                resume, meta, False, lr=config.joint_lr or 0.1 * config.lr)
    return net, {"train_seconds": r1.seconds + r2.seconds + r3.seconds,
                 "history": r1.history + r2.history + r3.history,
                 "stages": {"pretrain_reconstruct": r1.history, "pretrain_segment": r2.history,
                            "joint": r3.history}}
