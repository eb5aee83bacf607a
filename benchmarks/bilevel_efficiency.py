"""Cost of learning the smoothed-TV denoising parameters: MAID against HOAG and fixed-accuracy
baselines, all measured in the same run.

    python benchmarks/bilevel_efficiency.py [--quick] [--images 16] [--size 64] [--iters 60]
                                            [--max-cost 3000] [--out benchmarks/results]

Problem: ``TVDenoising`` (θ = log weight, log smoothing) on ``--images`` grey ``--size²`` patches
of scikit-image's bundled images (:func:`recon.data.natural_images.denoising_batch`, Gaussian
noise σ = 0.1), upper loss ``MSEToTarget`` (MSE to the clean patches), float64, θ₀ = (−5, −5),
bound ``log_smoothing ≥ −7`` (below it the inner problem becomes ill-conditioned and the loss
keeps creeping down towards plain TV). Every inner problem is solved by accelerated gradient
(``accelerated-gradient``) warm-started along the run, so one *lower-level iteration* is one
gradient step; the cost of a run is its cumulative lower-level + CG iterations (maximum over
the batch per solve, as in the History ``cost`` column; MAID also counts the Hessian, mixed and
gradient products its error bounds use; ``Unrolled`` counts its differentiable steps).

Methods (each stops after ``--iters`` outer iterations or once its cost passes ``--max-cost``):

* ``MAID`` -- :class:`bilevel.MAID`, default parameters (accuracies chosen by the method;
  spectral step lengths). ``MAID-adaptive`` -- the same with ``step_rule="adaptive"``, the
  authors' fixed grow factor.
* ``HOAG-geometric`` / ``-quadratic`` / ``-cubic`` -- :class:`bilevel.HOAG` with its default
  relative accuracies ``ε_k = 0.1·0.9ᵏ``, ``0.1/(k+1)²``, ``0.1/(k+1)³`` (inner solve relative to
  ``maxᵦ‖∇ₓΦ_b(x⁰)‖``, CG relative to ``‖(∇ₓℓ)_b‖``), its Armijo step rule and stopping rules.
* ``IFT-fixed`` -- HOAG's loop with the implicit (``ImplicitCG``) hypergradient at the fixed
  relative accuracy ``1e-3`` (inner and CG).
* ``QuasiNewton`` -- :class:`bilevel.QuasiNewton`, default parameters (inexact projected L-BFGS).
* ``L-BFGS-B exact`` -- the anchor: scipy's L-BFGS-B on exact hypergradients (inner solve and CG
  at 1e-10), what a user would write by hand; every evaluation counts as an iteration.
* ``Unrolled`` -- the same with :class:`bilevel.Unrolled` (``--unroll`` gradient steps of size
  ``1/L`` from the inner solution, differentiated by backprop; its cost counts them).

Every iterate's *true* upper loss ``ℓ(x̂(θ_k))`` is re-evaluated afterwards with the inner
problem solved to ``‖∇ₓΦ_b‖ ≤ 1e-9`` by Newton-CG (not counted as cost; the loss is then exact to
about ``Σ_b‖(∇ₓℓ)_b‖·1e-9/μ ≈ 3e-9``, far below the reach tolerance), so the curves compare what
each method actually reached, not its own inexact estimate. The *final* iterate of a run is its
last accepted one (HOAG may end on a rejected trial step, whose cost still counts). Target: MAID reaches the best
HOAG variant's final upper loss with at most a third of that variant's cost. *Best* = lowest
final true loss, variants within ``1e-4·(ℓ₀ − ℓ_best)`` of it count as tied and the cheapest
tied one is taken; *reaching* a loss ``L`` means a true loss ``≤ L + 1e-4·(ℓ₀ − L)``.

Writes ``<out>/bilevel_efficiency.json`` and ``<out>/bilevel_efficiency.png`` (upper loss against
cost and against seconds) and prints a table. ``--quick`` is a smoke run (4 images of 32², few
iterations); its numbers mean nothing.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # peer_problems (the anchor)

from bilevel import HOAG, MAID, Bounds, ImplicitCG, QuasiNewton, Unrolled, solve_inner  # noqa: E402
from bilevel.history import History  # noqa: E402
from recon.scripts import SMOKE_RUN, explicit_options, help_parser  # noqa: E402
from bilevel.history import save_figure  # noqa: E402
from bilevel.hypergrad import outer_gradients  # noqa: E402
from bilevel.linalg import batch_norm  # noqa: E402
from recon.data.natural_images import denoising_batch  # noqa: E402
from recon.losses import MSEToTarget  # noqa: E402
from recon.experts import FieldOfExpertsDenoising  # noqa: E402
from recon.problems import TVDenoising  # noqa: E402

DTYPE = torch.float64
#: problem name -> (inner problem class, θ₀, bounds); "foe" has 25 hyperparameters
PROBLEMS = {
    "tv": (TVDenoising, {"log_weight": -5.0, "log_smoothing": -5.0}, Bounds(lower={"log_smoothing": -7.0})),
    "foe": (FieldOfExpertsDenoising, {"log_weights": [-5.0] * 24, "log_smoothing": -5.0},
            Bounds(lower={"log_smoothing": -7.0})),
}
INNER_METHOD = "accelerated-gradient"
INNER_MAX_ITER = 5000
TRUE_TOL = 1e-9
REACH_RTOL = 1e-4


def _theta(values):
    return {k: torch.tensor(v, dtype=DTYPE) for k, v in values.items()}


def _theta_text(theta, limit=4):
    """θ for a table cell: scalars as numbers, vectors as their first values."""
    parts = []
    for k, v in theta.items():
        if isinstance(v, list):
            head = ", ".join(f"{x:.2f}" for x in v[:limit])
            parts.append(f"{k}=[{head}{', …' if len(v) > limit else ''}]")
        else:
            parts.append(f"{k}={v:.3f}")
    return " ".join(parts)


def _stop_at_cost(max_cost):
    return lambda record, theta: record["cost"] >= max_cost


def true_losses(inner, outer, batch, history):
    """``ℓ(x̂(θ_k))`` for every record, the inner problem solved to ``TRUE_TOL`` (warm-started)."""
    out, x, cache = [], None, {}
    for r in history:
        key = json.dumps(r["theta"], sort_keys=True)
        if key not in cache:
            theta = _theta(r["theta"])
            sol = solve_inner(inner, theta, batch, TRUE_TOL, x0=x, method="newton-cg", max_iter=200)
            x = sol.x
            cache[key] = float(outer(sol.x, theta, batch))
        out.append(cache[key])
    return out


def first_reach(costs, losses, level):
    """Cost of the first record whose loss is ``≤ level`` (``None`` if never)."""
    return next((c for c, l in zip(costs, losses) if l <= level), None)


def _exact_anchor(inner, outer, theta0, batch, max_cost):
    """The anchor row: scipy's L-BFGS-B on exact hypergradients (inner solve and CG at 1e-10),
    its evaluations as History records (stopped once its cost passes ``max_cost``)."""
    from peer_problems import exact_lbfgsb

    r = exact_lbfgsb(inner, outer, theta0, batch, bounds=BOUNDS_OF[0], inner_method=INNER_METHOD,
                     inner_max_iter=INNER_MAX_ITER, maxiter=200)
    records = [dict(rec, accepted=True, iteration=i) for i, rec in enumerate(r["history"])
               if rec["cost"] <= max_cost or i == 0]
    return History(records), r["message"]


BOUNDS_OF = [None]  # the bounds of the problem being run (set by run)


def _compare(runs):
    """Summary rows and the ratio MAID cost to the best HOAG's loss level / that HOAG's cost:
    the best HOAG variant is the cheapest of those within ``REACH_RTOL`` of the lowest final loss."""
    loss0 = runs["MAID"]["true_loss"][0]
    hoag = {n: r for n, r in runs.items() if n.startswith("HOAG")}
    best_loss = min(r["true_loss"][r["final"]] for r in hoag.values())
    tie = REACH_RTOL * (loss0 - best_loss)
    tied = [n for n, r in hoag.items() if r["true_loss"][r["final"]] <= best_loss + tie]
    best = min(tied, key=lambda n: hoag[n]["history"][-1]["cost"])  # HOAG records hold all its cost
    target = hoag[best]["true_loss"][hoag[best]["final"]]
    level = target + REACH_RTOL * (loss0 - target)
    summary = []
    for name, r in runs.items():
        costs = r["history"].column("cost")
        total = costs[-1]  # cumulative at the end of the iteration, MAID's line search included
        i = r["final"]
        summary.append(dict(method=name, iterations=len(r["history"]), final_true_loss=r["true_loss"][i],
                            final_reported_loss=r["history"][i]["upper_loss"], cost=total,
                            seconds=r["history"][-1]["elapsed"],
                            cost_to_target=first_reach(costs, r["true_loss"], level),
                            theta=r["history"][i]["theta"], message=r["message"]))
    maid_reach = next(s["cost_to_target"] for s in summary if s["method"] == "MAID")
    best_row = next(s for s in summary if s["method"] == best)
    ratio = None if maid_reach is None else maid_reach / best_row["cost"]
    ratio_reach = (None if maid_reach is None or not best_row["cost_to_target"]
                   else maid_reach / best_row["cost_to_target"])
    per_variant = {}
    for n, r in hoag.items():
        fin = r["true_loss"][r["final"]]
        lvl = fin + REACH_RTOL * (loss0 - fin)
        reach = first_reach(runs["MAID"]["history"].column("cost"), runs["MAID"]["true_loss"], lvl)
        per_variant[n] = None if reach is None else reach / next(
            x["cost"] for x in summary if x["method"] == n)
    return dict(summary=summary, best_hoag=best, target_loss=target, reach_level=level,
                ratio_maid_cost_to_target_over_best_hoag_cost=ratio,
                ratio_maid_over_best_hoag_cost_to_target=ratio_reach,
                ratio_by_hoag_variant=per_variant)


def run(images=16, size=64, sigma=0.1, iters=60, max_cost=3000, unroll=30, seed=0, problem="tv"):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    warnings.simplefilter("ignore", RuntimeWarning)  # caps are flagged in the History instead
    inner_cls, THETA0, BOUNDS = PROBLEMS[problem]
    BOUNDS_OF[0] = BOUNDS
    inner, outer = inner_cls(), MSEToTarget()
    batch = denoising_batch(images, size, sigma, seed=seed, dtype=DTYPE)
    theta0 = _theta(THETA0)
    x0 = inner.init(theta0, batch)
    _, gx0, _, _ = outer_gradients(outer, x0, theta0, batch)
    eps0 = 0.1 * min(float(batch_norm(inner.grad(x0, theta0, batch)).max()), float(batch_norm(gx0).max()))
    stop = _stop_at_cost(max_cost)
    runs = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        history, message = fn()
        runs[name] = {"history": history, "message": message, "wall_seconds": time.perf_counter() - t0}
        last = history[-1]
        print(f"  {name:16s} {len(history):3d} it  cost {last['cost']:6d}  "
              f"loss {last['upper_loss']:.6g}  {runs[name]['wall_seconds']:6.1f} s", flush=True)

    print(f"{problem.upper()} denoising, {images} images {size}x{size}, sigma={sigma}, float64, eps0={eps0:.3g}")
    for name, rule in (("MAID", "spectral"), ("MAID-adaptive", "adaptive")):
        timed(name, lambda r=rule: (lambda res: (res.history, res.message))(
            MAID(inner, outer, max_iter=iters, max_cost=max_cost, bounds=BOUNDS, step_rule=r,
                 inner_method=INNER_METHOD, inner_max_iter=INNER_MAX_ITER).run(theta0, batch)))
    for schedule in ("geometric", "quadratic", "cubic"):
        timed(f"HOAG-{schedule}", lambda s=schedule: (lambda r: (r.history, r.message))(
            HOAG(inner, outer, tolerance=s, max_iter=iters, bounds=BOUNDS,
                 inner_method=INNER_METHOD, inner_max_iter=INNER_MAX_ITER, callback=stop).run(theta0, batch)))
    for name, est in (("IFT-fixed", ImplicitCG()), ("Unrolled", Unrolled(n_steps=unroll))):
        timed(name, lambda e=est: (lambda r: (r.history, r.message))(
            HOAG(inner, outer, estimator=e, tolerance="constant", tol0=1e-3, max_iter=iters,
                 bounds=BOUNDS, inner_method=INNER_METHOD, inner_max_iter=INNER_MAX_ITER,
                 callback=stop).run(theta0, batch)))

    timed("QuasiNewton", lambda: (lambda r: (r.history, r.message))(
        QuasiNewton(inner, outer, max_iter=iters, bounds=BOUNDS, inner_method=INNER_METHOD,
                    inner_max_iter=INNER_MAX_ITER, callback=stop).run(theta0, batch)))
    timed("L-BFGS-B exact", lambda: _exact_anchor(inner, outer, theta0, batch, max_cost))

    print("re-evaluating the true upper loss of every iterate ...", flush=True)
    for name, r in runs.items():
        r["true_loss"] = true_losses(inner, outer, batch, r["history"])
        accepted = [i for i, rec in enumerate(r["history"]) if rec.get("accepted", True)]
        r["final"] = accepted[-1] if accepted else len(r["history"]) - 1

    cmp = _compare(runs)
    return dict(config=dict(problem=problem, images=images, size=size, sigma=sigma, dtype="float64",
                            theta0=THETA0, n_hyperparameters=sum(len(v) if isinstance(v, list) else 1
                                                                 for v in THETA0.values()),
                            bounds={"lower": BOUNDS.lower}, inner_method=INNER_METHOD, iters=iters,
                            max_cost=max_cost, unroll=unroll, eps0=eps0, seed=seed,
                            threads=torch.get_num_threads()),
                **cmp, target_ratio=1 / 3,
                target_met=cmp["ratio_maid_cost_to_target_over_best_hoag_cost"] is not None
                and cmp["ratio_maid_cost_to_target_over_best_hoag_cost"] <= 1 / 3,
                runs={n: {"history": r["history"].as_dict(), "true_loss": r["true_loss"], "final": r["final"],
                          "message": r["message"], "wall_seconds": r["wall_seconds"]}
                      for n, r in runs.items()})


def plot(result, path):
    """Suboptimality ``ℓ(x̂(θ_k)) − ℓ_min`` (``ℓ_min``: the lowest true loss any run reached)
    against cost and against seconds, log-log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    floor = 1e-10
    best = min(min(r["true_loss"]) for r in result["runs"].values())
    styles = {"MAID": dict(color="k", lw=2.2, zorder=5)}
    for name, r in result["runs"].items():
        h = r["history"]
        gap = [max(l - best, floor) for l in r["true_loss"]]
        for ax, xkey in zip(axes, ("cost", "elapsed")):
            ax.plot(h[xkey], gap, marker=".", ms=3, label=name, **styles.get(name, {}))
    for ax in axes:
        ax.axhline(max(result["reach_level"] - best, floor), color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3, which="both")
    axes[0].set_xlabel("cumulative lower-level + CG iterations")
    axes[1].set_xlabel("seconds")
    axes[0].set_ylabel(f"true upper loss − {best:.6g}")
    axes[0].legend(fontsize=9)
    c = result["config"]
    ratio = result["ratio_maid_cost_to_target_over_best_hoag_cost"]
    fig.suptitle(f"{c['problem'].upper()} denoising ({c['n_hyperparameters']} hyperparameters), {c['images']}×{c['size']}², σ={c['sigma']} (dotted: "
                 f"{result['best_hoag']}'s final loss) — MAID cost to reach it / its cost = "
                 f"{'not reached' if ratio is None else f'{ratio:.2f}'}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def table(result):
    lines = [f"{'method':16s} {'iters':>5s} {'cost':>7s} {'cost→target':>11s} {'seconds':>8s} "
             f"{'final true loss':>15s}  θ"]
    for s in result["summary"]:
        reach = "—" if s["cost_to_target"] is None else str(s["cost_to_target"])
        lines.append(f"{s['method']:16s} {s['iterations']:5d} {s['cost']:7d} {reach:>11s} {s['seconds']:8.2f} "
                     f"{s['final_true_loss']:15.8g}  {_theta_text(s['theta'])}")
    r = result["ratio_maid_cost_to_target_over_best_hoag_cost"]
    rr = result["ratio_maid_over_best_hoag_cost_to_target"]
    lines.append(f"best HOAG variant: {result['best_hoag']} (final true loss {result['target_loss']:.8g})")
    lines.append("MAID cost to reach it / its total cost = "
                 + ("not reached" if r is None else f"{r:.3f}")
                 + f"  (target ≤ 1/3: {'met' if result['target_met'] else 'NOT met'})")
    lines.append("MAID cost to reach it / its own cost to reach it = "
                 + ("n/a" if rr is None else f"{rr:.3f}"))
    lines.append("per HOAG variant (MAID cost to its final loss / its cost): "
                 + ", ".join(f"{k}: {'not reached' if v is None else f'{v:.2f}'}"
                             for k, v in result["ratio_by_hoag_variant"].items()))
    return "\n".join(lines)


def main(argv=None):
    p = help_parser(__doc__)
    p.add_argument("--quick", action="store_true",
                   help="smoke run (4 images of 32², 12 iterations) in runs/quick/; its numbers "
                        "are not meaningful, and options given are kept")
    p.add_argument("--problem", choices=sorted(PROBLEMS), default="tv",
                   help="tv: smoothed TV (2 hyperparameters); foe: field of experts (25)")
    p.add_argument("--images", type=int, default=None, help="default 16 (tv), 8 (foe)")
    p.add_argument("--size", type=int, default=None, help="default 64 (tv), 32 (foe)")
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--max-cost", type=int, default=3000)
    p.add_argument("--unroll", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default benchmarks/results (--quick: runs/quick)")
    a = p.parse_args(argv)
    given = explicit_options(p, argv)
    a.images = a.images or (16 if a.problem == "tv" else 8)
    a.size = a.size or (64 if a.problem == "tv" else 32)
    if a.quick:
        for key, value in dict(images=4, size=32, iters=12, max_cost=600, unroll=10).items():
            if key not in given:
                setattr(a, key, value)
    a.out = a.out or (os.path.join("runs", "quick") if a.quick else
                      os.path.join(os.path.dirname(__file__), "results"))
    result = run(a.images, a.size, a.sigma, a.iters, a.max_cost, a.unroll, a.seed, a.problem)
    result["config"]["quick"] = a.quick
    print(table(result))
    os.makedirs(a.out, exist_ok=True)
    stem = "bilevel_efficiency" + ("" if a.problem == "tv" else f"_{a.problem}") + ("_quick" if a.quick else "")
    with open(os.path.join(a.out, stem + ".json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    plot(result, os.path.join(a.out, stem + ".png"))
    print(f"wrote {os.path.join(a.out, stem + '.json')} and .png")
    if a.quick:
        print(SMOKE_RUN)


if __name__ == "__main__":
    main()
