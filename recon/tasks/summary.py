"""Tables, seeds and intervals of the task examples (``examples/cityscapes.py``,
``examples/stanford_dogs.py``).

With ``S`` seeds every route ``r`` has one score ``m_s(r)`` per seed ``s`` (the seed redraws the
training images, the test scenes where the data are generated, and both noise draws; ``T*``
is the same). The table shows the means ``m̄(r) = (1/S) Σ_s m_s(r)``. A comparison of two
routes is *paired* — both were scored on the same draw — so its interval comes from the
per-seed differences ``d_s = m_s(r) − m_s(b)``:

.. math::

    \\bar d \\pm t_{0.975,\\,S-1}\\, \\frac{\\mathrm{sd}(d)}{\\sqrt S},
    \\qquad \\mathrm{sd}(d)^2 = \\frac{1}{S-1} \\sum_s (d_s - \\bar d)^2

(Student's t, 95 %), the same for the fraction of the clean-minus-noisy gap recovered,
``g_s(r) = (m_s(r) − m_s(\\text{noisy})) / (m_s(\\text{clean}) − m_s(\\text{noisy}))``.
A route whose outer loop did not stop with ``success=True`` at some seed is marked ``*`` in the
table and listed under it with the loop's message.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ["t_interval", "mean_rows", "gap_recovered", "paired_differences", "gap_intervals",
           "comparisons", "format_table", "not_converged", "format_interval", "format_intervals",
           "label_width"]

#: the baseline every learned route is compared with
MSE_ROUTE = "TV, MSE-learned θ"


def t_interval(values: Sequence[float], level: float = 0.95) -> Dict[str, Any]:
    """``{"mean", "low", "high", "half_width", "n", "values"}``: the mean of ``values`` and its
    Student-t interval ``x̄ ± t_{(1+level)/2, n−1}·sd/√n`` (NaN bounds for a single value)."""
    from scipy.stats import t as student_t

    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = sum(vals) / n
    if n == 1:
        half = math.nan
    else:
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
        half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half, "n": n,
            "values": vals}


def gap_recovered(rows: List[Dict[str, Any]], metric: str, route: str) -> float:
    """``(m_route − m_noisy) / (m_clean − m_noisy)``: the fraction of the clean-minus-noisy gap of
    the task metric ``m`` that a route recovers (1: as good as clean images); ``nan`` when T*
    is not better on clean than on noisy images (no gap to recover: the fraction would flip
    sign or blow up)."""
    m = {r["route"]: r[metric] for r in rows}
    gap = m["T* on clean"] - m["T* on noisy"]
    return float("nan") if not gap > 0 else (m[route] - m["T* on noisy"]) / gap


def mean_rows(per_seed: Sequence[List[Dict[str, Any]]], metrics: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per route: the metric means over the seeds' rows (same routes, same order),
    ``converged`` (every seed's loop succeeded; absent for rows without a loop), ``messages``
    of the seeds whose loop did not, and the per-seed θ and seconds. One seed: its rows."""
    if len(per_seed) == 1:
        return [dict(r) for r in per_seed[0]]
    out = []
    for i, first in enumerate(per_seed[0]):
        rows = [seed_rows[i] for seed_rows in per_seed]
        if any(r["route"] != first["route"] for r in rows):
            raise ValueError(f"the seeds' rows differ at position {i}: {[r['route'] for r in rows]}")
        row = {"route": first["route"], **{m: sum(r[m] for r in rows) / len(rows) for m in metrics},
               "seeds": len(rows)}
        if "converged" in first:
            row["converged"] = all(r["converged"] for r in rows)
            row["messages"] = {str(s): r["hoag_message"] for s, r in enumerate(rows) if not r["converged"]}
            row["theta_per_seed"] = [r["theta"] for r in rows]
            row["iterations_per_seed"] = [r["hoag_iterations"] for r in rows]
            row["seconds_per_seed"] = [r["seconds"] for r in rows]
        out.append(row)
    return out


def comparisons(routes: Sequence[str]) -> List[tuple]:
    """The ``(route, baseline)`` pairs reported: every learned route against
    :data:`MSE_ROUTE`, and a task-learned route of another regularizer also against that
    regularizer's own MSE-learned route."""
    pairs = []
    for r in routes:
        if r.startswith("T* on") or r == MSE_ROUTE or MSE_ROUTE not in routes:
            continue
        own = f"{r.split(',')[0]}, MSE-learned θ"
        if "task-learned" in r and own != MSE_ROUTE and own in routes:
            pairs.append((r, own))
        pairs.append((r, MSE_ROUTE))
    return pairs


def paired_differences(per_seed: Sequence[List[Dict[str, Any]]], metric: str,
                       pairs: Sequence[tuple]) -> Dict[str, Dict[str, Any]]:
    """``{"route − baseline": t_interval of the per-seed d_s}`` (module docstring)."""
    out = {}
    for route, base in pairs:
        d = []
        for rows in per_seed:
            m = {r["route"]: r[metric] for r in rows}
            d.append(m[route] - m[base])
        out[f"{route} − {base}"] = t_interval(d)
    return out


def gap_intervals(per_seed: Sequence[List[Dict[str, Any]]], metric: str) -> Dict[str, Dict[str, Any]]:
    """``{route: t_interval of g_s(route)}`` for every route after the two ``T*`` rows."""
    routes = [r["route"] for r in per_seed[0][2:]]
    return {route: t_interval([gap_recovered(rows, metric, route) for rows in per_seed])
            for route in routes}


def not_converged(results: Mapping[str, List[Dict[str, Any]]]) -> List[str]:
    """One line per (σ, route, seed) whose outer loop did not report success, with its message."""
    lines = []
    for sigma, rows in results.items():
        for r in rows:
            if r.get("converged", True):
                continue
            msgs = r.get("messages") or {"0": r.get("hoag_message", "")}
            lines += [f"  σ={sigma}, {r['route']}, seed {s}: {m}" for s, m in msgs.items()]
    return lines


def format_table(results: Dict[str, List[Dict[str, Any]]], metrics: Sequence[str]) -> str:
    """Rows = routes, columns = metric per noise level (the reference's table layout); a route
    whose loop did not converge at some σ or seed is marked ``*`` and listed below."""
    sigmas = list(results)
    routes = [r["route"] for r in results[sigmas[0]]]
    w = max([52] + [len(r) + 3 for r in routes])
    head = f"{'':<{w}}" + "".join(f"{f'{m} σ={s}':>14}" for s in sigmas for m in metrics)
    lines = [head]
    for i, route in enumerate(routes):
        mark = " *" if any(not results[s][i].get("converged", True) for s in sigmas) else ""
        lines.append(f"{route + mark:<{w}}" + "".join(f"{results[s][i][m]:>14.4f}"
                                                     for s in sigmas for m in metrics))
    missed = not_converged(results)
    if missed:
        lines += ["* not converged (the outer loop did not report success):", *missed]
    return "\n".join(lines)


def format_interval(iv: Mapping[str, Any], digits: int = 4) -> str:
    """``"+0.0123 [+0.0040, +0.0206] (seeds: …)"`` for a :func:`t_interval` result."""
    vals = ", ".join(f"{v:+.{digits}f}" for v in iv["values"])
    if iv["n"] == 1:
        return f"{iv['mean']:+.{digits}f} (one seed: no interval)"
    return (f"{iv['mean']:+.{digits}f} [{iv['low']:+.{digits}f}, {iv['high']:+.{digits}f}] "
            f"(seeds: {vals})")


def label_width(labels, least: int = 70) -> int:
    """Width of a text column of ``labels``: the longest label, at least ``least`` characters."""
    return max([least] + [len(label) for label in labels])


def format_intervals(differences: Mapping[str, Mapping[str, Any]], metric: str,
                     sigma: Optional[str] = None) -> List[str]:
    """Text lines: the paired differences with their 95 % intervals."""
    at = "" if sigma is None else f" at σ={sigma}"
    lines = [f"paired differences of {metric}{at} (mean [95 % t-interval] over seeds):"]
    w = label_width(differences)
    lines += [f"  {name:<{w}} {format_interval(iv)}" for name, iv in differences.items()]
    return lines
