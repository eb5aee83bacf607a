"""Time and accuracy of one hypergradient on smoothed-TV denoising, all estimators in one run.

    python benchmarks/hypergradient.py [--batch 32] [--size 64] [--repeats 5] [--quick]

Setup: ``TVDenoising`` on ``batch`` grey 64×64 patches (scikit-image images, σ = 0.1), θ near the
learned optimum, the inner problem solved once to ``‖∇ₓΦ_b‖ ≤ 1e-10`` (float64) / ``1e-6``
(float32) and shared by every estimator, so only the hypergradient is timed:

* ``ImplicitCG`` with the closed-form TV products (default) and with autograd double backward;
* torchopt ``custom_root`` with ``solve_cg`` and with its default solver (``solve_normal_cg``),
  optimality condition ``∇ₓΦ`` from ``torch.func.grad``;
* ``Unrolled`` (K gradient steps from the noisy image, step 1/L).

"Same residual tolerance": the linear system ``∇²ₓₓΦ q = ∇ₓℓ`` is solved until the *batch*
residual ``‖r‖ ≤ τ = rtol·‖∇ₓℓ‖`` (rtol 1e-8 in float64, 1e-4 in float32): torchopt's
``rtol``; ``ImplicitCG`` stops each sample at ``τ/√B``, which implies the same batch bound.
Accuracy is the relative error against a float64 reference (ImplicitCG, rtol 1e-13).
Writes ``benchmarks/results/hypergradient.json`` (``--out``).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bilevel import ImplicitCG, Unrolled, solve_inner  # noqa: E402
from bilevel.hypergrad import outer_gradients  # noqa: E402
from recon.data.natural_images import denoising_batch  # noqa: E402
from recon.io import atomic_write  # noqa: E402
from recon.scripts import SMOKE_RUN, apply_quick, help_parser  # noqa: E402
from recon.losses import MSEToTarget  # noqa: E402
from recon.problems import TVDenoising  # noqa: E402

THETA = {"log_weight": -1.9, "log_smoothing": -6.0}


def _timeit(fn, repeats):
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _vec(g):
    return torch.stack([g["log_weight"].double().reshape(()), g["log_smoothing"].double().reshape(())])


def run(batch_size=32, size=64, repeats=5, unrolled_steps=(20, 100)):
    inner, outer = TVDenoising(), MSEToTarget()
    base = denoising_batch(batch_size, size, sigma=0.1, seed=0, dtype=torch.float64)
    theta64 = {k: torch.tensor(v, dtype=torch.float64) for k, v in THETA.items()}
    x64 = solve_inner(inner, theta64, base, tol=1e-12).x
    _, gx, _, _ = outer_gradients(outer, x64, theta64, base)
    tau_ref = 1e-13 * float(gx.norm())
    ref = _vec(ImplicitCG(max_iter=2000)(inner, outer, theta64, base, x64,
                                         tol=tau_ref / math.sqrt(batch_size)).theta_grad)
    rows = []
    for dtype, rtol, inner_tol in ((torch.float32, 1e-4, 1e-6), (torch.float64, 1e-8, 1e-10)):
        batch = {k: v.to(dtype) for k, v in base.items()}
        theta = {k: v.to(dtype) for k, v in theta64.items()}
        x = solve_inner(inner, theta, batch, tol=inner_tol).x
        _, gx, _, _ = outer_gradients(outer, x, theta, batch)
        tau = rtol * float(gx.norm())
        per_sample = tau / math.sqrt(batch_size)
        name = str(dtype).replace("torch.", "")

        def add(method, fn, cg_iters=None):
            sec, g = _timeit(fn, repeats)
            err = float((_vec(g) - ref).norm() / ref.norm())
            rows.append(dict(dtype=name, method=method, ms=1e3 * sec, rel_error=err, cg_iterations=cg_iters))

        for mode, label in (("closed", "ImplicitCG (closed-form TV products)"),
                            ("autograd", "ImplicitCG (autograd double backward)")):
            est = ImplicitCG(max_iter=1000, warm_start=False, hessian=mode)
            hg = est(inner, outer, theta, batch, x, tol=per_sample)
            add(label, lambda est=est: est(inner, outer, theta, batch, x, tol=per_sample).theta_grad,
                hg.cg_iterations)
            if mode == "closed":  # the bound: CG iterations × one closed-form Hessian product
                hvp = inner.linearize(x, theta, batch)[0]
                v = torch.randn_like(x)
                sec, _ = _timeit(lambda: [hvp(v) for _ in range(hg.cg_iterations)], repeats)
                rows.append(dict(dtype=name, method="bound: CG it × one closed-form product",
                                 ms=1e3 * sec, rel_error=math.nan, cg_iterations=hg.cg_iterations))

        try:
            import torchopt
        except ImportError:  # pragma: no cover - optional cross-check
            torchopt = None
        if torchopt is not None:
            def phi(xx, lw, ls):
                return inner.objective(xx, {"log_weight": lw, "log_smoothing": ls}, batch).sum()

            def optimality(xx, lw, ls):
                return torch.func.grad(phi)(xx, lw, ls)

            for label, solve in (
                    ("torchopt custom_root + solve_cg",
                     torchopt.linear_solve.solve_cg(rtol=rtol, atol=0.0, maxiter=1000)),
                    ("torchopt custom_root + default (normal CG)",
                     torchopt.linear_solve.solve_normal_cg(rtol=rtol, atol=0.0, maxiter=1000))):
                @torchopt.diff.implicit.custom_root(optimality, argnums=(1, 2), solve=solve)
                def solver(x0, lw, ls):
                    return x.clone()

                def hyper(solver=solver):
                    lw = theta["log_weight"].clone().requires_grad_(True)
                    ls = theta["log_smoothing"].clone().requires_grad_(True)
                    loss = outer(solver(x, lw, ls), {}, batch)
                    g_lw, g_ls = torch.autograd.grad(loss, (lw, ls))
                    return {"log_weight": g_lw, "log_smoothing": g_ls}

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    add(label, hyper)

        for K in unrolled_steps:
            est = Unrolled(n_steps=K, start="init")
            add(f"Unrolled (K={K}, from y)", lambda est=est: est(inner, outer, theta, batch, x).theta_grad)
    return rows


def main(argv=None):
    ap = help_parser(__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: batch 8, 32×32, 2 repeats, written to runs/quick/ (numbers not meaningful)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "hypergradient.json"))
    args = ap.parse_args(argv)
    if args.quick:
        for line in apply_quick(ap, args, argv, {"batch": 8, "size": 32, "repeats": 2},
                                out=os.path.join("runs", "quick", "hypergradient.json")):
            print(line)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    torch.set_num_threads(args.threads)
    rows = run(args.batch, args.size, args.repeats)
    print(f"one hypergradient, TVDenoising {args.batch}×{args.size}², θ = {THETA}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'dtype':<8}{'method':<44}{'ms':>9}{'vs ImplicitCG':>15}{'rel. error':>12}{'CG it':>7}")
    for dt in ("float32", "float64"):
        sub = [r for r in rows if r["dtype"] == dt]
        base = next(r["ms"] for r in sub if r["method"].startswith("ImplicitCG (closed"))
        for r in sub:
            r["ratio_to_implicit_cg"] = r["ms"] / base
            cg = "" if r["cg_iterations"] is None else str(r["cg_iterations"])
            print(f"{dt:<8}{r['method']:<44}{r['ms']:>9.1f}{r['ratio_to_implicit_cg']:>14.2f}×"
                  f"{r['rel_error']:>12.1e}{cg:>7}")
    with atomic_write(args.out, "w") as f:
        json.dump({"batch": args.batch, "size": args.size, "theta": THETA, "threads": args.threads,
                   "repeats": args.repeats, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    if args.quick:
        print(SMOKE_RUN)


if __name__ == "__main__":
    main()
