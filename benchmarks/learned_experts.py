"""Denoising with learned-filter field of experts vs the two-parameter smoothed TV, both learned
by HOAG for the MSE on the same natural-image patches; PSNR on training and held-out patches.

    PYTHONPATH=. python benchmarks/learned_experts.py --n-train 8 --size 32 --iters 60
    PYTHONPATH=. python benchmarks/learned_experts.py --optimizer lbfgs --iters 250

``--optimizer lbfgs``: scipy's L-BFGS-B on hypergradients at a fixed tight accuracy (inner and
CG tolerance 1e-9), what a user would run on exact hypergradients.

Writes ``benchmarks/results/learned_experts.json``. Few outer iterations: preliminary numbers,
not a converged comparison.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from bilevel import HOAG, Bounds, solve_inner
from recon.data.natural_images import denoising_batch
from recon.learned_experts import LearnedFieldOfExperts, initial_theta
from recon.losses import MSEToTarget
from recon.problems import TVDenoising
from recon.scripts import help_parser  # noqa: E402


def _psnr(x, batch) -> float:
    mse = ((x - batch["image"]) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse)).mean())


def _lbfgs(inner, theta0, batch, iters):
    """``(θ, iterations, message)`` of L-BFGS-B on ``ImplicitCG`` hypergradients (tol 1e-9)."""
    import numpy as np
    from scipy.optimize import minimize

    from bilevel import ImplicitCG

    names = list(theta0)
    outer, est, warm = MSEToTarget(), ImplicitCG(), {"x": None}

    def unpack(v):
        out, i = {}, 0
        for k in names:
            n = theta0[k].numel()
            out[k] = torch.tensor(v[i:i + n], dtype=theta0[k].dtype).reshape(theta0[k].shape)
            i += n
        return out

    def f(v):
        theta = unpack(v)
        warm["x"] = solve_inner(inner, theta, batch, tol=1e-9, x0=warm["x"]).x
        hg = est(inner, outer, theta, batch, warm["x"], tol=1e-9)
        return hg.loss, np.concatenate([hg.theta_grad[k].reshape(-1).numpy() for k in names])

    v0 = np.concatenate([theta0[k].reshape(-1).numpy() for k in names])
    r = minimize(f, v0, jac=True, method="L-BFGS-B", options={"maxiter": iters})
    return unpack(r.x), int(r.nit), str(r.message)


def _run(name, inner, theta0, train, test, iters, bounds=None, optimizer="hoag") -> dict:
    t0 = time.perf_counter()
    if optimizer == "hoag":
        res = HOAG(inner, MSEToTarget(), max_iter=iters, bounds=bounds).run(theta0, train)
        theta, n_iter, message = res.best_theta or res.theta, len(res.history), res.message
    else:
        theta, n_iter, message = _lbfgs(inner, theta0, train, iters)
    seconds = time.perf_counter() - t0
    row = {"method": name, "optimizer": optimizer,
           "n_theta": sum(v.numel() for v in theta.values()),
           "seconds": seconds, "iterations": n_iter, "message": message}
    for split, batch in (("train", train), ("test", test)):
        x = solve_inner(inner, theta, batch, tol=1e-8).x
        row[f"psnr_{split}"] = _psnr(x, batch)
        row[f"psnr_{split}_noisy"] = _psnr(batch["y"], batch)
    return row


def main(argv=None) -> list:
    p = help_parser(__doc__)
    p.add_argument("--n-train", type=int, default=8)
    p.add_argument("--n-test", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--filters", type=int, default=5, help="filter size s (s² − 1 DCT filters)")
    p.add_argument("--optimizer", choices=("hoag", "lbfgs"), default="hoag")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dt = torch.float64
    train = denoising_batch(args.n_train, args.size, args.sigma, seed=0, dtype=dt)
    test = denoising_batch(args.n_test, args.size, args.sigma, seed=100, dtype=dt)
    tv0 = {"log_weight": torch.tensor(math.log(0.05), dtype=dt),
           "log_smoothing": torch.tensor(math.log(1e-3), dtype=dt)}
    tv_bounds = Bounds(lower={"log_smoothing": -12.0}, upper={"log_smoothing": 0.0})
    s = args.filters
    foe = LearnedFieldOfExperts(s * s - 1, s)
    foe0 = initial_theta(s, log_weight=-4.0, log_smoothing=-4.0)
    bounds = tv_bounds if args.optimizer == "hoag" else None
    rows = [_run("smoothed TV (2)", TVDenoising(), tv0, train, test, args.iters, bounds,
                 args.optimizer),
            _run(f"learned FoE ({s * s - 1}x{s}x{s})", foe, foe0, train, test, args.iters,
                 optimizer=args.optimizer)]
    for r in rows:
        print(f"{r['method']:24s} |θ|={r['n_theta']:4d}  train {r['psnr_train']:.2f} dB "
              f"(noisy {r['psnr_train_noisy']:.2f})  test {r['psnr_test']:.2f} dB  "
              f"{r['iterations']} it, {r['seconds']:.0f} s: {r['message']}")
    out = Path(__file__).resolve().parent / "results" / f"learned_experts_{args.optimizer}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
