"""Seeds, paired intervals and the "not converged" marking of the task examples' tables."""
import math

import pytest

from recon.tasks.summary import (comparisons, format_intervals, format_table, gap_intervals,
                                 mean_rows, not_converged, paired_differences, t_interval)


def _rows(clean, noisy, mse, task, ok=True, message="converged: ..."):
    loop = lambda name, v, conv: {"route": name, "dice": v, "iou": v / 2, "theta": {"a": 0.0},  # noqa: E731
                                  "hoag_iterations": 5, "hoag_message": message if not conv else "ok",
                                  "converged": conv, "seconds": 1.0}
    return [{"route": "T* on clean", "dice": clean, "iou": clean / 2},
            {"route": "T* on noisy", "dice": noisy, "iou": noisy / 2},
            loop("TV, MSE-learned θ", mse, True), loop("TV, task-learned θ (tol 1e-05)", task, ok)]


def test_t_interval_is_the_student_t_interval_by_hand():
    iv = t_interval([1.0, 2.0, 3.0])
    # sd = 1, t_{0.975, 2} = 4.302652729911275
    assert iv["mean"] == pytest.approx(2.0)
    assert iv["half_width"] == pytest.approx(4.302652729911275 / math.sqrt(3), rel=1e-9)
    assert iv["low"] == pytest.approx(2.0 - iv["half_width"]) and iv["n"] == 3
    one = t_interval([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["half_width"])
    with pytest.raises(ValueError, match="at least one"):
        t_interval([])


def test_paired_differences_and_gaps_are_per_seed():
    seeds = [_rows(0.8, 0.4, 0.6, 0.65), _rows(0.8, 0.4, 0.5, 0.58), _rows(0.9, 0.5, 0.7, 0.74)]
    pairs = comparisons([r["route"] for r in seeds[0]])
    assert pairs == [("TV, task-learned θ (tol 1e-05)", "TV, MSE-learned θ")]
    d = paired_differences(seeds, "dice", pairs)["TV, task-learned θ (tol 1e-05) − TV, MSE-learned θ"]
    assert d["values"] == pytest.approx([0.05, 0.08, 0.04])
    assert d["mean"] == pytest.approx(0.17 / 3)
    assert d["low"] > 0  # the paired spread is small though the seeds' levels differ
    gaps = gap_intervals(seeds, "dice")
    assert gaps["TV, MSE-learned θ"]["values"] == pytest.approx([0.5, 0.25, 0.5])
    lines = format_intervals({"x − y": d}, "Dice", "0.3")
    assert "at σ=0.3" in lines[0] and "[+0.0" in lines[1] and "seeds: +0.0500" in lines[1]


def test_comparisons_of_another_regularizer_include_its_own_mse_route():
    routes = ["T* on clean", "T* on noisy", "TV, MSE-learned θ", "TV, task-learned θ (tol 0.001)",
              "FoE (625 θ), MSE-learned θ", "FoE (625 θ), task-learned θ (tol 1e-05)"]
    assert comparisons(routes) == [
        ("TV, task-learned θ (tol 0.001)", "TV, MSE-learned θ"),
        ("FoE (625 θ), MSE-learned θ", "TV, MSE-learned θ"),
        ("FoE (625 θ), task-learned θ (tol 1e-05)", "FoE (625 θ), MSE-learned θ"),
        ("FoE (625 θ), task-learned θ (tol 1e-05)", "TV, MSE-learned θ")]
    routes += ["Adaptive TV (410 θ), MSE-learned θ", "Adaptive TV (410 θ), task-learned θ (tol 1e-05)"]
    assert comparisons(routes)[-3:] == [
        ("Adaptive TV (410 θ), MSE-learned θ", "TV, MSE-learned θ"),
        ("Adaptive TV (410 θ), task-learned θ (tol 1e-05)", "Adaptive TV (410 θ), MSE-learned θ"),
        ("Adaptive TV (410 θ), task-learned θ (tol 1e-05)", "TV, MSE-learned θ")]


def test_a_route_that_did_not_converge_at_one_seed_is_marked_with_its_reason():
    seeds = [_rows(0.8, 0.4, 0.6, 0.65),
             _rows(0.8, 0.4, 0.5, 0.58, ok=False, message="iteration cap (max_iter=60) reached")]
    rows = mean_rows(seeds, ["dice", "iou"])
    assert [r["route"] for r in rows] == [r["route"] for r in seeds[0]]
    assert rows[3]["dice"] == pytest.approx(0.615) and rows[3]["seeds"] == 2
    assert rows[2]["converged"] and not rows[3]["converged"]
    assert rows[3]["messages"] == {"1": "iteration cap (max_iter=60) reached"}
    assert "converged" not in rows[0]
    table = format_table({"0.3": rows}, ["dice", "iou"])
    lines = table.splitlines()
    assert lines[4].startswith("TV, task-learned θ (tol 1e-05) *")
    assert not lines[3].rstrip().endswith("*") and "TV, MSE-learned θ *" not in table
    assert "not converged" in table
    assert "σ=0.3, TV, task-learned θ (tol 1e-05), seed 1: iteration cap (max_iter=60) reached" in table
    # one seed: the rows themselves, marked from their own message
    single = mean_rows(seeds[1:], ["dice", "iou"])
    assert single[3]["dice"] == 0.58
    assert not_converged({"0.3": single}) == [
        "  σ=0.3, TV, task-learned θ (tol 1e-05), seed 0: iteration cap (max_iter=60) reached"]
    assert "not converged" not in format_table({"0.3": mean_rows(seeds[:1], ["dice", "iou"])}, ["dice"])


def test_gap_fraction_is_nan_when_clean_is_not_better_than_noisy():
    from recon.tasks.summary import gap_recovered
    assert gap_recovered(_rows(0.8, 0.4, 0.6, 0.7), "dice", "TV, MSE-learned θ") == pytest.approx(0.5)
    for clean in (0.4, 0.0021):  # no gap, or a "gap" of the wrong sign (0.0021 vs 0.0186 noisy)
        noisy = 0.4 if clean == 0.4 else 0.0186
        assert math.isnan(gap_recovered(_rows(clean, noisy, 0.01, 0.02), "dice", "TV, MSE-learned θ"))
