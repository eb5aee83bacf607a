"""Outer loops side by side on problems with known optima: QuasiNewton, HOAG, MAID and the anchor
"L-BFGS-B on exact hypergradients (scipy)".

    python benchmarks/outer_loops.py [--problems quickstart foe ridge20 ridge100 units quadratic
                                      cleaning] [--threads 1] [--max-iter 100] [--quick]
                                     [--out benchmarks/results]

Problems (θ₀, bounds):

* ``quickstart`` -- smoothed-TV denoising (``TVDenoising`` + ``MSEToTarget``) on 16 grey 64²
  patches, σ = 0.1, float64, θ₀ = (log_weight −5, log_smoothing −3), −12 ≤ log_smoothing ≤ 2;
* ``quickstart32`` -- the same problem in float32 (the loops run in float32; the true losses and
  the gaps are computed in float64);
* ``foe`` -- the 25-hyperparameter field of experts of ``bilevel_efficiency.py --problem foe``
  (8 patches 32², θ₀ = −5, log_smoothing ≥ −7);
* ``ridge20`` / ``ridge100`` -- ridge with one penalty per feature (:mod:`peer_problems`), θ₀ = 0;
* ``units`` -- the 20-feature ridge with the data × 1e-3, 1, 1e3, means and sums, θ₀ = 0;
* ``quadratic`` -- benchopt's generated quadratic bilevel problem (``simulated``);
* ``cleaning`` -- data cleaning on scikit-learn's digits (1024 weights).

Every loop runs with its defaults (inner solver Newton-CG, ``max_iter = --max-iter``); MAID only
where the inner problem gives a strong-convexity constant. The anchor is
``scipy.optimize.minimize(method="L-BFGS-B")`` with ``solve_inner`` at tolerance 1e-10 and
``ImplicitCG`` at 1e-10 absolute (:func:`peer_problems.exact_lbfgsb`); its cost is the sum of
inner iterations and CG iterations over all evaluations, as the loops count ``cost``.

For each run: the *true* upper loss at the final θ (``Result.theta``; inner problem solved in
closed form or by Newton-CG at 1e-10), its relative gap ``(ℓ − ℓ*)/|ℓ*|`` and the fraction of
the starting gap left ``(ℓ − ℓ*)/(ℓ₀ − ℓ*)`` to the best known loss ``ℓ*`` (the problem's
reference optimum, or the lowest true loss any run reached), outer iterations, cost, seconds,
``success`` and a verdict: "reached optimum" (success, gap ≤ 1e-6), "success=False: <reason>",
"CRASH: <exception>" or "FALSE SUCCESS" (success=True with a gap > 1e-6; on the ridge problems
and on data cleaning, where the exact or a tightly computed gradient is known, a success at
another stationary point of the non-convex upper loss is named as such). Then the targets of
the QuasiNewton loop are checked.

Writes ``<out>/outer_loops.json`` and ``<out>/outer_loops.png`` (loss gap against cost per
problem: exact losses of every iterate on the closed-form problems, the loops' recorded losses
on the others). ``--quick`` is a smoke run on tiny problems written to a temporary folder; its
numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import peer_problems as pp  # noqa: E402
from bilevel import HOAG, MAID, Bounds, ImplicitCG, QuasiNewton, solve_inner  # noqa: E402
from recon.scripts import help_parser  # noqa: E402

DTYPE = torch.float64
SUCCESS_GAP = 1e-6
#: the anchor's L-BFGS-B iteration cap (scipy's default; a smoke run lowers it)
ANCHOR_MAXITER = [15000]
ALL = ("quickstart", "quickstart32", "foe", "ridge20", "ridge100", "units", "quadratic", "cleaning")


# ---------------------------------------------------------------------------------------------
# problems
# ---------------------------------------------------------------------------------------------
def _tight_loss(inner, outer, batch, tol=1e-10):
    """``θ ↦ ℓ(x̂(θ), θ)`` with Newton-CG at ``tol`` (warm-started from the previous call)."""
    cache: Dict[str, Any] = {}

    def loss_at(theta):
        sol = solve_inner(inner, theta, batch, tol, x0=cache.get("x"), max_iter=200)
        cache["x"] = sol.x
        with torch.no_grad():
            return float(outer(sol.x, theta, batch))

    return loss_at


def _as_float32(built):
    """A float64 problem run in float32 (θ₀ and the batch cast); true losses stay in float64."""
    inner, outer, theta0, batch, bounds, info = built
    loss64 = info["loss_at"]
    info["loss_at"] = lambda theta: loss64({k: v.double() for k, v in theta.items()})
    theta32 = {k: v.float() for k, v in theta0.items()}
    batch32 = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
               for k, v in batch.items()}
    return inner, outer, theta32, batch32, bounds, info


def _denoising(kind: str, quick: bool):
    from recon.data.natural_images import denoising_batch
    from recon.experts import FieldOfExpertsDenoising
    from recon.losses import MSEToTarget
    from recon.problems import TVDenoising

    if kind.startswith("quickstart"):
        n, size = (2, 16) if quick else (16, 64)
        inner = TVDenoising()
        theta0 = {"log_weight": torch.tensor(-5.0, dtype=DTYPE),
                  "log_smoothing": torch.tensor(-3.0, dtype=DTYPE)}
        bounds = Bounds(lower={"log_smoothing": -12.0}, upper={"log_smoothing": 2.0})
    else:
        n, size = (2, 16) if quick else (8, 32)
        inner = FieldOfExpertsDenoising()
        theta0 = {"log_weights": torch.full((24,), -5.0, dtype=DTYPE),
                  "log_smoothing": torch.tensor(-5.0, dtype=DTYPE)}
        bounds = Bounds(lower={"log_smoothing": -7.0})
    outer = MSEToTarget()
    batch = denoising_batch(n, size, 0.1, seed=0, dtype=DTYPE)
    info = dict(name=kind, best_loss=None, loss_at=_tight_loss(inner, outer, batch),
                mu_available=inner.strong_convexity_constant(theta0, batch) is not None,
                reference="lowest true loss of the runs below",
                n_hyperparameters=sum(v.numel() for v in theta0.values()))
    built = (inner, outer, theta0, batch, bounds, info)
    return [(kind, _as_float32(built) if kind == "quickstart32" else built)]


def _ridge_grad_norm(inner, outer, batch):
    """``θ ↦ ‖∇ℓ(θ)‖`` exactly (autograd through the closed form)."""
    def grad_norm(theta):
        t = theta["log_lam"].detach().double().requires_grad_(True)
        (g,) = torch.autograd.grad(outer(inner.closed_form(t, batch), {}, batch), t)
        return float(g.norm())
    return grad_norm


def _tight_grad_norm(inner, outer, batch):
    """``θ ↦ ‖∇ℓ(θ)‖`` at a tight accuracy (inner solve and CG at 1e-10; no bounds)."""
    def grad_norm(theta):
        sol = solve_inner(inner, theta, batch, 1e-10, max_iter=500)
        hg = ImplicitCG(max_iter=2000)(inner, outer, theta, batch, sol.x, 1e-10)
        return hg.norm()
    return grad_norm


def _with_grad(built):
    inner, outer, theta0, batch, bounds, info = built
    info["grad_norm_at"] = _ridge_grad_norm(inner, outer, batch)
    return built


def problems(names: List[str], quick: bool):
    """``[(label, (inner, outer, θ₀, batch, bounds, info)), ...]`` for the selected names."""
    d20, d100 = (4, 6) if quick else (20, 100)
    out = []
    for name in names:
        if name in ("quickstart", "quickstart32", "foe"):
            out += _denoising(name, quick)
        elif name == "ridge20":
            out.append(("ridge20", _with_grad(pp.per_feature_ridge(d20))))
        elif name == "ridge100":
            out.append(("ridge100", _with_grad(pp.per_feature_ridge(d100))))
        elif name == "units":
            for conv in ("mean", "sum"):
                for s in (1e-3, 1.0, 1e3):
                    out.append((f"units {conv} x{s:g}",
                                _with_grad(pp.per_feature_ridge(d20, convention=conv, scale=s))))
        elif name == "quadratic":
            out.append(("quadratic", pp.benchopt_quadratic()))
        elif name == "cleaning":
            kw = dict(n_train=32, ref_maxiter=5) if quick else {}
            built = pp.data_cleaning(**kw)
            built[5]["grad_norm_at"] = _tight_grad_norm(*built[:2], built[3])
            out.append(("cleaning", built))
        else:
            raise ValueError(f"unknown problem {name!r}; choose from {ALL}")
    return out


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
def _loop_run(cls, inner, outer, theta0, batch, bounds, max_iter):
    res = cls(inner, outer, bounds=bounds, max_iter=max_iter).run(theta0, batch)
    curve = [(r["cost"], r["upper_loss"], r.get("theta")) for r in res.history
             if r.get("accepted", True)]
    return dict(theta=res.theta, success=bool(res.success), message=res.message,
                iterations=res.n_iter, cost=res.history[-1]["cost"] if len(res.history) else 0,
                curve=curve)


def _anchor_run(inner, outer, theta0, batch, bounds, max_iter):
    r = pp.exact_lbfgsb(inner, outer, theta0, batch, bounds, maxiter=ANCHOR_MAXITER[0])
    curve = [(h["cost"], h["upper_loss"], None) for h in r["history"]]
    return dict(theta=r["theta"], success=r["success"], message=r["message"],
                iterations=r["nit"], cost=r["cost"], curve=curve,
                note=f"{r['nfev']} evaluations")


LOOPS = {"QuasiNewton": lambda *a: _loop_run(QuasiNewton, *a),
         "HOAG": lambda *a: _loop_run(HOAG, *a),
         "MAID": lambda *a: _loop_run(MAID, *a),
         "L-BFGS-B exact": _anchor_run}


def run_one(name: str, built, max_iter: int, loops=None) -> Dict[str, Any]:
    """Every loop (or those named in ``loops``) on one problem; the true final losses and the
    gaps to the best known loss."""
    inner, outer, theta0, batch, bounds, info = built
    rows = []
    for loop, fn in LOOPS.items():
        if loops and loop not in loops:
            continue
        row: Dict[str, Any] = dict(problem=name, loop=loop)
        if loop == "MAID" and not info["mu_available"]:
            row.update(skipped=True, verdict="skipped: no strong-convexity constant")
            rows.append(row)
            continue
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = fn(inner, outer, {k: v.clone() for k, v in theta0.items()}, batch, bounds,
                         max_iter)
            row.update(out)
            row["true_loss"] = info["loss_at"](out["theta"])
        except Exception as exc:  # a crash is a result here
            row.update(crash=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-800:])
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  {name:22s} {loop:15s} {row['seconds']:7.1f} s", flush=True)
    loss0 = info["loss_at"](theta0)
    finals = [r["true_loss"] for r in rows if math.isfinite(r.get("true_loss", math.nan))]
    known = [] if info["best_loss"] is None else [info["best_loss"]]
    best = min(known + finals + [loss0])
    for r in rows:
        _score(r, best, loss0, info, theta0)
    return dict(name=name, best_loss=best, loss0=loss0, rows=rows,
                info={k: v for k, v in info.items() if not callable(v)})


def _score(r: Dict[str, Any], best: float, loss0: float, info: Dict[str, Any], theta0) -> None:
    if r.get("skipped"):
        return
    if "crash" in r:
        r["verdict"] = "CRASH: " + r["crash"][:70]
        return
    gap = r["true_loss"] - best
    r["gap_rel"] = gap / abs(best) if best != 0 else gap
    if r["loop"] == "QuasiNewton":
        r["first_cost_1e-6"] = _first_cost(r, best, info)
    r["gap_frac"] = gap / (loss0 - best) if loss0 != best else math.nan
    if not r["success"]:
        at = " (at the optimum)" if r["gap_rel"] <= SUCCESS_GAP else ""
        r["verdict"] = f"success=False{at}: {_short(r['message'])}"
    elif r["gap_rel"] <= SUCCESS_GAP:
        r["verdict"] = "reached optimum"
    else:
        r["verdict"] = "FALSE SUCCESS"
        grad_norm = info.get("grad_norm_at")
        if grad_norm is not None:
            g, g0 = grad_norm(r["theta"]), grad_norm(theta0)
            r["exact_grad_ratio"] = g / g0
            if g <= 1e-6 * g0:
                r["verdict"] = f"success at another stationary point (‖∇ℓ‖/‖∇ℓ₀‖ = {g / g0:.1e})"


def _first_cost(r: Dict[str, Any], best: float, info: Dict[str, Any], gap: float = 1e-6):
    """The cost at which an accepted iterate's *true* loss first came within ``gap``
    (relative) of ``best`` (``None``: never)."""
    for cost, _, theta in r.get("curve", []):
        if theta is None:
            return None
        th = {k: torch.tensor(v, dtype=DTYPE) for k, v in theta.items()}
        if (info["loss_at"](th) - best) <= gap * abs(best):
            return cost
    return None


def _short(msg: str, n: int = 60) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= n else msg[:n - 1] + "…"


# ---------------------------------------------------------------------------------------------
# targets of the QuasiNewton loop
# ---------------------------------------------------------------------------------------------
def _qn(res, name):
    return next((r for r in res[name]["rows"] if r["loop"] == "QuasiNewton"), None) if name in res else None


def _ok(row, gap_key, gap, iters=None, cost=None, success=True):
    if row is None or "crash" in row:
        return False
    good = row[gap_key] <= gap and (not success or row["success"])
    if iters is not None:
        good = good and row["iterations"] <= iters
    if cost is not None:
        good = good and row["cost"] <= cost
    return good


def targets(res: Dict[str, Any]) -> List[str]:
    """One line per target the QuasiNewton loop is held to (only for problems that ran)."""
    lines = []

    def line(label, row, ok):
        if row is None:
            return
        got = ("crash" if "crash" in row else
               f"gap {row['gap_rel']:.2e} (frac {row['gap_frac']:.2e}), {row['iterations']} it, "
               f"cost {row['cost']}, success={row['success']}")
        lines.append(f"{'met   ' if ok else 'MISSED'} {label}: {got}")

    r = _qn(res, "quickstart")
    line("quickstart: gap ≤ 1e-6, success, ≤ 20 it, cost ≤ 500", r, _ok(r, "gap_rel", 1e-6, 20, 500))
    r = _qn(res, "quickstart32")
    line("quickstart32: gap ≤ 1e-6, success, ≤ 30 it", r, _ok(r, "gap_rel", 1e-6, 30))
    r = _qn(res, "foe")
    first = None if r is None else r.get("first_cost_1e-6")
    line(f"foe: gap ≤ 1e-6 at cost ≤ 1000 (first reached at cost {first})", r,
         first is not None and first <= 1000)
    for name in ("ridge20", "ridge100"):
        r = _qn(res, name)
        line(f"{name}: gap ≤ 1e-4 in ≤ 100 it", r, _ok(r, "gap_rel", 1e-4, 100, success=False))
    r = _qn(res, "quadratic")
    line("quadratic: success in ≤ 40 it (gap ≤ 1e-6)", r, _ok(r, "gap_rel", 1e-6, 40))
    r = _qn(res, "cleaning")
    line("cleaning: success with ≤ 1e-6 of the gap left", r, _ok(r, "gap_frac", 1e-6))
    units = [row for n, p in res.items() if n.startswith("units") for row in p["rows"]]
    if units:
        def bad(rows):
            return [f"{row['problem']}/{row['loop']}: {row['verdict']}" for row in rows
                    if row.get("verdict", "").startswith(("CRASH", "FALSE SUCCESS"))]
        ours = bad([r for r in units if r["loop"] != "L-BFGS-B exact"])
        lines.append(("met    units (QuasiNewton, HOAG, MAID): no crash, no false success" if not ours
                      else "MISSED units (QuasiNewton, HOAG, MAID): " + "; ".join(ours)))
        anchor = bad([r for r in units if r["loop"] == "L-BFGS-B exact"])
        if anchor:  # scipy's absolute default tolerances; not a target of the library
            lines.append("note   units, the scipy anchor: " + "; ".join(anchor))
    return lines


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def table(res: Dict[str, Any]) -> str:
    head = (f"{'problem':20s} {'loop':15s} {'gap rel':>9s} {'gap frac':>9s} {'iters':>5s} "
            f"{'cost':>7s} {'seconds':>8s} {'succ':>5s}  verdict")
    lines = [head, "-" * len(head)]
    for name, p in res.items():
        lines.append(f"{name} (best known loss {p['best_loss']:.10g}; start {p['loss0']:.6g})")
        for r in p["rows"]:
            if r.get("skipped") or "crash" in r:
                lines.append(f"{'':20s} {r['loop']:15s} {'':>9s} {'':>9s} {'':>5s} {'':>7s} "
                             f"{r.get('seconds', 0):8.1f} {'':>5s}  {r['verdict']}")
                continue
            lines.append(f"{'':20s} {r['loop']:15s} {r['gap_rel']:9.2e} {r['gap_frac']:9.2e} "
                         f"{r['iterations']:5d} {r['cost']:7d} {r['seconds']:8.1f} "
                         f"{str(r['success']):>5s}  {r['verdict']}")
    return "\n".join(lines)


def _curve_gaps(r, best, info):
    """(costs, relative gaps) of the accepted iterates: exact losses where the problem has a
    closed form (``exact_curves``), the recorded ones otherwise."""
    exact = info.get("exact_curves", False)
    costs, gaps = [], []
    for cost, loss, theta in r.get("curve", []):
        if exact and theta is not None:
            loss = info["loss_at"]({k: torch.tensor(v, dtype=DTYPE) for k, v in theta.items()})
        if math.isfinite(loss):
            costs.append(max(cost, 1))
            gaps.append(max((loss - best) / abs(best), 1e-16))
    return costs, gaps


def plot(res: Dict[str, Any], infos: Dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from bilevel.history import save_figure

    plt.rcParams.update({"font.size": 9})
    names = list(res)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for r in res[name]["rows"]:
            costs, gaps = _curve_gaps(r, res[name]["best_loss"], infos[name])
            if costs:
                ax.plot(costs, gaps, marker=".", ms=3, lw=1.2, label=r["loop"])
        ax.axhline(SUCCESS_GAP, color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("cost (inner + CG iterations)", fontsize=9)
        ax.set_ylabel("(ℓ − ℓ*)/|ℓ*|", fontsize=9)
        ax.grid(True, alpha=0.3, which="both")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=9)
    fig.suptitle("relative upper-loss gap against cost (dotted: 1e-6; recorded losses on "
                 "quickstart, foe and cleaning, exact elsewhere)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _jsonable(res):
    def clean(r):
        out = {k: v for k, v in r.items() if k not in ("theta", "curve")}
        if "theta" in r:
            out["theta"] = {k: v.detach().double().reshape(-1).tolist() for k, v in r["theta"].items()}
        out["curve"] = [(c, l) for c, l, _ in r.get("curve", [])]
        return out
    return {n: dict(p, rows=[clean(r) for r in p["rows"]]) for n, p in res.items()}


def main(argv=None):
    ap = help_parser(__doc__)
    ap.add_argument("--problems", nargs="+", choices=ALL, default=list(ALL))
    ap.add_argument("--loops", nargs="+", choices=list(LOOPS), default=None,
                    help="run only these loops (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--max-iter", type=int, default=100, help="outer iteration cap of the loops")
    ap.add_argument("--quick", action="store_true", help="smoke run on tiny problems (temp folder)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args(argv)
    if a.threads < 1:
        ap.error(f"--threads must be ≥ 1, got {a.threads}")
    if a.max_iter < 1:
        ap.error(f"--max-iter must be ≥ 1, got {a.max_iter}")
    torch.set_num_threads(a.threads)
    max_iter = min(a.max_iter, 3) if a.quick else a.max_iter
    ANCHOR_MAXITER[0] = 5 if a.quick else 15000
    partial = a.quick or a.loops is not None  # never over the committed results
    out = tempfile.mkdtemp(prefix="outer_loops_") if partial else a.out
    if a.quick:
        print("smoke run: numbers are not meaningful")
    res, infos = {}, {}
    for name, built in problems(a.problems, a.quick):
        info = built[5]
        info["exact_curves"] = not name.startswith(("quickstart", "foe", "cleaning"))
        infos[name] = info
        res[name] = run_one(name, built, max_iter, a.loops)
    print(table(res))
    print("targets of the QuasiNewton loop:")
    for line in targets(res):
        print("  " + line)
    os.makedirs(out, exist_ok=True)
    payload = dict(config=dict(threads=a.threads, max_iter=max_iter, quick=a.quick,
                               problems=a.problems), results=_jsonable(res), targets=targets(res))
    with open(os.path.join(out, "outer_loops.json"), "w") as f:
        json.dump(payload, f, indent=1, default=float)
    plot(res, infos, os.path.join(out, "outer_loops.png"))
    print(f"wrote {os.path.join(out, 'outer_loops.json')} and outer_loops.png")
    if a.quick:
        print("smoke run: numbers are not meaningful")


if __name__ == "__main__":
    main()
