"""HOAG and MAID defaults on ridge regression at any scale (means or sums, any n, any units).

    python benchmarks/scale_free.py [--n 50,200,1000] [--scales 1e-3,1,1e3]

Ridge regression ``Φ(w; θ) = c·agg((Xw − y)²) + c·e^θ‖w‖²`` (``agg`` the mean or the sum over the
``n`` training samples), upper loss ``c·agg((X_v w − y_v)²)``, one hyperparameter ``λ = e^θ``
from ``λ₀ = 1``; the exact ``λ*`` by a bounded scalar search on the closed form. Prints, per
convention / ``n`` / ``c`` / method: outer iterations, the relative error of ``λ``, success and
the stopping message; writes ``benchmarks/results/scale_free.json``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), os.path.join(HERE, "..", "tests")]

from bilevel import HOAG, MAID  # noqa: E402
from bilevel_problems import RidgeInner, RidgeOuter, ridge_optimum, ridge_problem  # noqa: E402
from recon.scripts import help_parser  # noqa: E402


def main(argv=None):
    ap = help_parser(__doc__)
    ap.add_argument("--n", default="50,200,1000")
    ap.add_argument("--scales", default="1e-3,1,1e3")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "scale_free.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"{'conv':>4} {'n':>5} {'c':>7} {'method':>6} {'iters':>5} {'rel.err λ':>10} {'success':>7}  s")
    for conv in ("mean", "sum"):
        for n in [int(v) for v in args.n.split(",")]:
            batch = ridge_problem(n, seed=n)
            for c in [float(v) for v in args.scales.split(",")]:
                inner, outer = RidgeInner(conv, c), RidgeOuter(conv, c)
                lam_star = ridge_optimum(inner, outer, batch)
                for name, cls in (("HOAG", HOAG), ("MAID", MAID)):
                    t0 = time.perf_counter()
                    res = cls(inner, outer).run({"lam": torch.tensor(0.0, dtype=torch.float64)}, batch)
                    err = abs(math.exp(float(res.theta["lam"])) / lam_star - 1)
                    row = dict(convention=conv, n=n, c=c, method=name, iterations=res.n_iter,
                               rel_error=err, success=res.success, message=res.message,
                               lam_star=lam_star, seconds=time.perf_counter() - t0)
                    rows.append(row)
                    print(f"{conv:>4} {n:>5} {c:>7.0e} {name:>6} {res.n_iter:>5} {err:>10.1e} "
                          f"{str(res.success):>7}  {row['seconds']:.1f}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
