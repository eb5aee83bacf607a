"""Joint LSPD over the task weight C and seeds at a reduced size: Dice, PSNR and the predicted
lesion fraction per run (a collapsed run predicts no lesion pixel: fraction 0, Dice 0).

    PYTHONPATH=. python benchmarks/joint_sweep.py --pretrain-epochs 6 --epochs 3 --C 0.5 0.9 1.0
    PYTHONPATH=. python benchmarks/joint_sweep.py --pretrain-epochs 0 --epochs 9 --C 0.9 --no-prior

``--no-prior`` builds the U-Net with PyTorch's default output bias instead of the lesion prior
(the control that shows the collapse). Writes ``benchmarks/results/joint_sweep*.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import recon.joint.routes as routes
from recon.scripts import help_parser
from recon.joint import (JointConfig, build_joint_data, default_joint_setup,
                         default_model_options, evaluate_net, predict, run_route)


def main(argv=None) -> list:
    p = help_parser(__doc__)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n-angles", type=int, default=30)
    p.add_argument("--n-train", type=int, default=64)
    p.add_argument("--n-test", type=int, default=32)
    p.add_argument("--pretrain-epochs", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--C", type=float, nargs="+", default=[0.5, 0.9, 1.0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--no-prior", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.no_prior:
        routes.lesion_prior = lambda data: None  # the default UNet output bias
    setup = default_joint_setup(image_size=args.image_size, n_angles=args.n_angles,
                                n_train=args.n_train, n_test=args.n_test)
    options = default_model_options(recon_channels=8, recon_iterations=3)
    op, train = build_joint_data(setup, "train")
    _, test = build_joint_data(setup, "test", operator=op)
    rows = []
    for seed in range(args.seeds):
        for C in args.C:
            cfg = JointConfig(epochs=args.epochs, batch_size=4, lr=3e-3, seed=seed,
                              progress=False, pretrain_epochs=args.pretrain_epochs)
            t0 = time.perf_counter()
            net, _ = run_route("joint_lspd", op, train, cfg, options, C=C)
            res = evaluate_net(net, test)
            frac = float(predict(net, test)["logits"].argmax(1).float().mean())
            rows.append({"seed": seed, "C": C, "dice": float(res["dice"].mean()),
                         "psnr": float(res["psnr"].mean()), "lesion_fraction": frac,
                         "seconds": time.perf_counter() - t0})
            print(f"seed {seed} C {C}: Dice {rows[-1]['dice']:.3f}  PSNR {rows[-1]['psnr']:.2f} dB  "
                  f"predicted lesion fraction {frac:.4f}", flush=True)
    tag = f"joint_sweep_pre{args.pretrain_epochs}{'_noprior' if args.no_prior else ''}.json"
    out = Path(__file__).resolve().parent / "results" / tag
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "mask_fraction": float(train["mask"].mean()),
                               "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
