"""Command line: ``python -m recon.joint train|evaluate``.

::

    python -m recon.joint train --route joint_lspd --C 0.5 --epochs 8 --out runs/joint_lspd
    python -m recon.joint train --route joint_lspd --out runs/joint_lspd --resume
    python -m recon.joint evaluate runs/joint_lspd/model.pt runs/clean/model.pt

``train`` writes ``<out>/last.pt`` (full training state, every epoch; ``--resume`` continues it
and refuses a checkpoint of another route) and ``<out>/model.pt`` (weights + route, C, setup and
network sizes); ``evaluate`` rebuilds each model and its test split and prints Dice, PSNR, SSIM.
"""
from __future__ import annotations

import argparse
from ..training.argtypes import float_above, float_in, int_at_least
from pathlib import Path
from typing import Any, Sequence

import torch

from recon.checkpoint import load_checkpoint, save_checkpoint
from recon.scripts import plain_text

from .data import build_joint_data, default_joint_setup
from .routes import (ROUTES, build_reconstructor, build_segmenter, default_model_options,
                     evaluate_net, run_route)
from .trainer import JointConfig, JointNet

__all__ = ["main", "train_from_args", "load_joint_model", "evaluate_checkpoints"]


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    d, m = default_joint_setup(), default_model_options()
    pos, nonneg = int_at_least(1), int_at_least(0)
    rate = float_above(0.0, strict=True)
    p.add_argument("--route", choices=ROUTES, required=True)
    p.add_argument("--C", type=float_in(0.0, 1.0), default=0.5, help="task weight C in [0, 1] (joint routes)")
    for key in ("image_size", "n_angles", "n_train", "n_test", "data_seed"):
        p.add_argument("--" + key.replace("_", "-"), type=nonneg if key == "data_seed" else pos,
                       default=d[key], help=f"({d[key]})")
    p.add_argument("--photons", type=float_above(0.0, strict=True), default=d["photons"],
                   help="Poisson I0 (7e4)")
    for key, value in m.items():
        p.add_argument("--" + key.replace("_", "-"), type=pos, default=value, help=f"({value})")
    p.add_argument("--epochs", type=pos, default=7, help="(7)")
    p.add_argument("--batch-size", type=pos, default=4, help="(4)")
    p.add_argument("--lr", type=rate, default=3e-3, help="Adam learning rate (3e-3)")
    p.add_argument("--clip-grad-norm", type=float_in(0.0), default=1.0,
                   help="global gradient-norm clip (> 0; 0 turns clipping off)")
    p.add_argument("--pretrain-epochs", type=nonneg, default=0,
                   help="joint routes: pretrain the reconstructor on MSE and the U-Net on clean "
                        "images for this many epochs each, then train jointly (0: from scratch)")
    p.add_argument("--joint-lr", type=rate, default=None,
                   help="learning rate of the joint stage after pretraining (default --lr / 10)")
    p.add_argument("--seed", type=nonneg, default=0, help="(0)")
    p.add_argument("--threads", type=pos, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="checkpoint folder (default runs/joint/<route>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out where it stopped (the same settings only; "
                        "other settings are refused with the list of differences)")
    p.add_argument("--no-progress", action="store_true")


def train_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run ``train``; returns ``{"model_path", "train_seconds"}``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    # every setting is checked before any work (data simulation, training)
    from .losses import check_weight

    check_weight(args.C)
    config = JointConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         clip_grad_norm=None if args.clip_grad_norm == 0 else args.clip_grad_norm,
                         seed=args.seed, progress=not args.no_progress,
                         pretrain_epochs=args.pretrain_epochs, joint_lr=args.joint_lr)
    setup = default_joint_setup(image_size=args.image_size, n_angles=args.n_angles,
                                n_train=args.n_train, n_test=args.n_test,
                                data_seed=args.data_seed, photons=args.photons)
    options = default_model_options(**{k: getattr(args, k) for k in default_model_options()})
    out = Path(args.out or f"runs/joint/{args.route}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; the checkpoints need a folder")
    if args.resume and not out.is_dir():
        raise FileNotFoundError(f"cannot resume: --out {str(out)!r} does not exist; train "
                                "without --resume")
    operator, train = build_joint_data(setup, "train")
    net, info = run_route(args.route, operator, train, config, options, C=args.C, out_dir=out,
                          resume=args.resume, fbp_filter=setup["fbp_filter"],
                          metadata={"setup": setup})
    path = save_checkpoint({"route": args.route, "C": args.C, "setup": setup, "options": options,
                            "seed": args.seed, "model": net.state_dict(),
                            "train_seconds": info["train_seconds"]}, out / "model.pt")
    return {"model_path": str(path), "train_seconds": info["train_seconds"]}


def load_joint_model(path: str | Path) -> tuple[JointNet, dict, Any]:
    """``(net, checkpoint, operator)`` from a ``model.pt`` written by ``train``."""
    state = load_checkpoint(path)
    if state.get("route") not in ROUTES:
        raise ValueError(f"{str(path)!r} is not a recon.joint model (route {state.get('route')!r})")
    setup, options = state["setup"], state["options"]
    operator, _ = build_joint_data(setup, "train", n=1)
    rec = (None if state["route"] == "clean"
           else build_reconstructor({"sequential": "lpd", "joint_lpd": "lpd", "joint_lspd": "lspd",
                                     "joint_sklspd": "sklspd"}[state["route"]], operator, options,
                                    setup["fbp_filter"]))
    net = JointNet(rec, build_segmenter(options))
    net.load_state_dict(state["model"])
    return net, state, operator


def evaluate_checkpoints(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Mean Dice / PSNR / SSIM on each model's own test split (rows of plain values)."""
    rows = []
    for path in paths:
        net, state, operator = load_joint_model(path)
        _, test = build_joint_data(state["setup"], "test", operator=operator)
        res = evaluate_net(net, test)
        rows.append({"path": str(path), "route": state["route"], "C": state["C"],
                     **{k: float(v.mean()) if torch.is_tensor(v) else v for k, v in res.items()}})
    return rows


def main(argv: Sequence[str] | None = None) -> Any:
    """``python -m recon.joint {train,evaluate} ...``."""
    parser = argparse.ArgumentParser(prog="python -m recon.joint", description=plain_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_arguments(sub.add_parser("train", help="train one route"))
    ev = sub.add_parser("evaluate", help="score model.pt files on their test split")
    ev.add_argument("checkpoints", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "train":
        out = train_from_args(args)
        print(f"trained in {out['train_seconds']:.1f} s; model {out['model_path']}")
        return out
    rows = evaluate_checkpoints(args.checkpoints)
    for r in rows:
        print(f"{r['route']:14s} C={r['C']:.2f}  Dice {r.get('dice', float('nan')):.4f}  "
              f"PSNR {r.get('psnr', float('nan')):6.2f} dB  SSIM {r.get('ssim', float('nan')):.4f}  "
              f"{r['path']}")
    return rows
