"""Minibatch bilevel learning of smoothed-TV denoising over a whole data set, against full batch.

    python benchmarks/minibatch.py            # 2048 training patches 32², minibatches of 32
    python benchmarks/minibatch.py --quick    # 256 patches 16², a smoke run (no JSON written)

Data: ``n`` grey patches of scikit-image's bundled pictures with Gaussian noise σ = 0.1 (training,
validation and test sets from different seeds). θ = (log weight, log smoothing) of
``recon.problems.TVDenoising``, upper loss ``recon.losses.MSEToTarget``, from θ₀ = (−5, −3),
``log_smoothing`` in [−7, 2] (the bound is active at the optimum: lower, the exact full-batch
reference gets too costly for two cores).

Rows: the full-batch optimum θ* (scipy L-BFGS-B on exact hypergradients over the whole training
set: inner solves and CG to 1e-8 relative, warm-started), full-batch HOAG (defaults, 50 iterations), and
``MinibatchBilevel`` with its optimisers (Adam + cosine, SAG with RMS scaling + cosine) — the test loss
and its gap to θ*'s, ``cost`` (inner + CG iterations, the loops' unit), ``work`` (each iteration
times the samples it ran on: compute), seconds. Peak memory: one short run per data-set size in
a fresh process (samples cut on the fly, bounded warm-start cache), its peak RSS.
Writes ``benchmarks/results/minibatch.json`` (not with ``--quick``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from bilevel import HOAG, Bounds, ImplicitCG, MinibatchBilevel, solve_inner  # noqa: E402
from bilevel.linalg import batch_norm  # noqa: E402
from recon.data.natural_images import image_patches  # noqa: E402
from recon.losses import MSEToTarget  # noqa: E402
from recon.problems import TVDenoising  # noqa: E402
from recon.scripts import help_parser  # noqa: E402

DT = torch.float64
# log smoothing ≥ −7: below it (the MSE optimum runs to −12 here) the inner problems get so ill
# conditioned that the exact full-batch reference costs ~20× more; the bound keeps it feasible
BOUNDS = Bounds(lower={"log_smoothing": -7.0}, upper={"log_smoothing": 2.0})
NAMES = ("log_smoothing", "log_weight")


def dataset(n: int, size: int, seed: int, sigma: float = 0.1):
    clean = image_patches(n, size, seed=seed, dtype=DT)
    g = torch.Generator().manual_seed(seed + 1)
    return {"image": clean, "y": clean + sigma * torch.randn(clean.shape, generator=g, dtype=DT)}


def theta0():
    return {"log_weight": torch.tensor(-5.0, dtype=DT), "log_smoothing": torch.tensor(-3.0, dtype=DT)}


def mse(theta, data, chunk: int = 512) -> float:
    """The upper loss at θ over a whole set (inner problems to 1e-10 relative)."""
    inner, total = TVDenoising(), 0.0
    for i in range(0, len(data["y"]), chunk):
        b = {k: v[i:i + chunk] for k, v in data.items()}
        ref = float(batch_norm(inner.grad(b["y"], theta, b)).max())
        x = solve_inner(inner, theta, b, 1e-10 * ref).x
        total += float(((x - b["image"]) ** 2).mean()) * len(b["y"])
    return total / len(data["y"])


def lbfgsb_optimum(train, max_iter: int = 100):
    """scipy L-BFGS-B on exact full-batch hypergradients; returns (θ*, cost, evaluations)."""
    from scipy.optimize import minimize
    inner, outer, est = TVDenoising(), MSEToTarget(), ImplicitCG(max_iter=1000)
    state = {"x": None, "cost": 0, "evals": 0}
    ref = float(batch_norm(inner.grad(train["y"], theta0(), train)).max())

    def f(v):
        th = {n: torch.tensor(float(x), dtype=DT) for n, x in zip(NAMES, v)}
        sol = solve_inner(inner, th, train, 1e-8 * ref, x0=state["x"], max_iter=200)
        state["x"] = sol.x
        hg = est(inner, outer, th, train, sol.x, 1e-8, relative=True)
        state["cost"] += sol.max_iterations + hg.cg_iterations
        state["evals"] += 1
        return hg.loss, np.array([float(hg.theta_grad[n]) for n in NAMES])

    bounds = [(BOUNDS.lower.get(n), BOUNDS.upper.get(n)) for n in NAMES]
    res = minimize(f, [float(theta0()[n]) for n in NAMES], jac=True, method="L-BFGS-B",
                   bounds=bounds, options={"maxiter": max_iter, "ftol": 1e-12, "gtol": 1e-10})
    return {n: torch.tensor(float(x), dtype=DT) for n, x in zip(NAMES, res.x)}, state, res


def row(name, theta, test, opt_test, cost, work, seconds, **extra):
    t = mse(theta, test)
    r = dict(method=name, theta={n: float(theta[n]) for n in NAMES}, test_loss=t,
             gap=t / opt_test - 1, cost=int(cost), work=int(work), seconds=seconds, **extra)
    print(f"{name:<34}{t:>11.6f}{100 * r['gap']:>8.3f} %{r['cost']:>8}{r['work']:>11}"
          f"{seconds:>8.1f}  θ = ({r['theta']['log_weight']:.3f}, {r['theta']['log_smoothing']:.3f})",
          flush=True)
    return r


def minibatch_rows(args, train, val, test, opt_test):
    rows = []
    settings = {"adam": dict(lr=args.adam_lr), "sag": dict(lr=args.sag_lr)}
    for opt, kw in settings.items():
        loop = MinibatchBilevel(TVDenoising(), MSEToTarget(), optimizer=opt, epochs=args.epochs,
                                batch_size=args.batch_size, bounds=BOUNDS, **kw)
        t0 = time.perf_counter()
        res = loop.run(theta0(), train, val)
        sec = time.perf_counter() - t0
        last = res.history[-1]
        ep = res.state["epochs"]
        extra = dict(success=res.success, message=res.message,
                     val_work=sum(e.get("val_work", 0) for e in ep),
                     check_work=ep[-1]["check_cost"] * args.batch_size,  # every check batch is full
                     epochs=[{k: v for k, v in e.items() if k != "theta"} | {"theta": e["theta"]} for e in ep])
        rows.append(row(f"minibatch {opt} (final θ)", res.theta, test, opt_test, last["cost"] +
                        ep[-1]["check_cost"], ep[-1]["work"], sec, **extra))
        rows.append(row(f"minibatch {opt} (best-val θ)", res.best_theta, test, opt_test,
                        rows[-1]["cost"], rows[-1]["work"], sec))
    return rows


def memory_rows(args):
    """Peak RSS of a short minibatch run per data-set size, each in a fresh process."""
    out = []
    for n in args.memory_sizes:
        code = (f"import sys; sys.path.insert(0, {os.path.join(HERE, '..')!r}); "
                f"sys.path.insert(0, {HERE!r}); import minibatch as M; M._memory_probe({n}, {args.memory_patch})")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
        rec = json.loads(done.stdout.strip().splitlines()[-1])
        out.append(rec)
        print(f"  n = {n:>6}: peak RSS {rec['peak_mib']:.0f} MiB, {rec['peak_mib'] - rec['base_mib']:.0f} MiB above the start, "
              f"cache {rec['cache_mib']:.1f} MiB in {rec['cached']} samples", flush=True)
    return out


class _LazyPatches(torch.utils.data.Dataset):
    """Noisy patches cut on the fly from one bundled picture (memory independent of ``n``)."""

    def __init__(self, n: int, size: int):
        from recon.data.natural_images import load_bundled_image
        self.img = torch.from_numpy(load_bundled_image("camera"))
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(int(i))
        r, c = (int(v) for v in torch.randint(0, self.img.shape[0] - self.size, (2,), generator=g))
        clean = self.img[r:r + self.size, c:c + self.size][None].to(DT)
        return {"image": clean, "y": clean + 0.1 * torch.randn(clean.shape, generator=g, dtype=DT),
                "index": int(i)}


def _rss(field: str) -> float:
    """``VmRSS``/``VmHWM`` of this process in MiB (Linux ``/proc``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return math.nan


def _memory_probe(n: int, size: int) -> None:
    torch.set_num_threads(1)
    ds = _LazyPatches(n, size)
    ds[0]
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
        fh.write("5")
    base = _rss("VmRSS")
    cap = 8 * 2 ** 20
    loop = MinibatchBilevel(TVDenoising(), MSEToTarget(), epochs=1, batch_size=32, bounds=BOUNDS,
                            cache_bytes=cap, gtol=0.0)
    res = loop.run(theta0(), ds)
    cache = res.state["cache"]
    cache_mib = sum(t.numel() * t.element_size() for t in cache["x"] + cache["q"]) / 2 ** 20
    peak = _rss("VmHWM")
    print(json.dumps({"n": n, "size": size, "peak_mib": peak, "base_mib": base,
                      "cache_mib": cache_mib, "cached": len(cache["keys"]), "cap_mib": cap / 2 ** 20}))


def parse(argv):
    ap = help_parser(__doc__)
    ap.add_argument("--n-train", type=int, default=2048)
    ap.add_argument("--n-val", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=512)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--adam-lr", type=float, default=0.2)
    ap.add_argument("--sag-lr", type=float, default=0.2)
    ap.add_argument("--hoag-iters", type=int, default=50)
    ap.add_argument("--memory-sizes", type=int, nargs="*", default=[512, 2048, 8192])
    ap.add_argument("--memory-patch", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "minibatch.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.n_train, args.n_val, args.n_test, args.size, args.epochs = 256, 64, 64, 16, 3
        args.hoag_iters, args.memory_sizes, args.memory_patch = 20, [256, 1024], 16
    return args


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(1)
    train, val = dataset(args.n_train, args.size, 0), dataset(args.n_val, args.size, 500)
    test = dataset(args.n_test, args.size, 1000)
    print(f"{args.n_train} training patches {args.size}², minibatches of {args.batch_size}, "
          f"{args.epochs} epochs; test set {args.n_test}")
    t0 = time.perf_counter()
    th_star, st, res = lbfgsb_optimum(train)
    sec = time.perf_counter() - t0
    opt_test = mse(th_star, test)
    n = args.n_train
    print(f"{'':<34}{'test loss':>11}{'gap':>10}{'cost':>8}{'work':>11}{'s':>8}")
    rows = [row("full batch: L-BFGS-B (exact) = θ*", th_star, test, opt_test, st["cost"],
                st["cost"] * n, sec, evaluations=st["evals"], message=str(res.message))]
    t0 = time.perf_counter()
    hoag = HOAG(TVDenoising(), MSEToTarget(), max_iter=args.hoag_iters, bounds=BOUNDS).run(theta0(), train)
    rows.append(row("full batch: HOAG", hoag.theta, test, opt_test, hoag.history[-1]["cost"],
                    hoag.history[-1]["cost"] * n, time.perf_counter() - t0, success=hoag.success,
                    message=hoag.message, iterations=hoag.n_iter))
    rows += minibatch_rows(args, train, val, test, opt_test)
    ref = {r["method"]: r for r in rows}
    for r in rows[2:]:
        for base in ("full batch: L-BFGS-B (exact) = θ*", "full batch: HOAG"):
            key = "vs_lbfgsb" if "L-BFGS" in base else "vs_hoag"
            r[key] = {"work": r["work"] / ref[base]["work"], "seconds": r["seconds"] / ref[base]["seconds"]}
        print(f"  {r['method']:<32} work / L-BFGS-B {r['vs_lbfgsb']['work']:.3f}, / HOAG "
              f"{r['vs_hoag']['work']:.3f}; seconds / L-BFGS-B {r['vs_lbfgsb']['seconds']:.3f}; "
              f"success={r.get('success')}: {r.get('message', '')}")
    print("peak memory against the data-set size (cache capped at 8 MiB):")
    memory = memory_rows(args) if args.memory_sizes else []
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "memory": memory}, fh, indent=1, default=str)
        print(f"wrote {args.out}")
    return rows, memory


if __name__ == "__main__":
    main()
