import math

import pytest
import torch

from bilevel import HOAG, ImplicitCG, Unrolled, solve_inner
from recon.losses import MSEToTarget
from recon.problems import TVDenoising

DT = torch.float64
THETA = {"log_weight": torch.tensor(-2.0, dtype=DT), "log_smoothing": torch.tensor(-4.0, dtype=DT)}


def _batch():
    y = torch.rand(2, 1, 8, 8, dtype=DT)
    return {"y": y, "image": y.clone()}


def test_unknown_theta_name():
    with pytest.raises(ValueError, match="unknown name.*'lam'"):
        solve_inner(TVDenoising(), dict(THETA, lam=torch.tensor(1.0)), _batch(), tol=1e-6)


def test_missing_theta_name():
    with pytest.raises(ValueError, match="missing.*log_smoothing"):
        solve_inner(TVDenoising(), {"log_weight": THETA["log_weight"]}, _batch(), tol=1e-6)


def test_non_finite_theta():
    with pytest.raises(ValueError, match=r"theta\['log_weight'\].*non-finite"):
        solve_inner(TVDenoising(), dict(THETA, log_weight=torch.tensor(float("nan"))), _batch(), tol=1e-6)


def test_integer_theta_is_named():
    with pytest.raises(TypeError, match=r"theta\['log_weight'\] must be a floating-point.*int64"):
        HOAG(TVDenoising(), MSEToTarget(), max_iter=1).run(
            dict(THETA, log_weight=torch.tensor(-2)), _batch())


def test_outer_loss_returning_a_python_float_is_named():
    class FloatLoss(MSEToTarget):
        def forward(self, x, theta, batch):
            return float(super().forward(x, theta, batch).detach())

    with pytest.raises(TypeError, match="outer loss must return a scalar torch.Tensor.*float"):
        HOAG(TVDenoising(), FloatLoss(), max_iter=1).run(dict(THETA), _batch())


def test_non_finite_data():
    b = _batch()
    b["y"][0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"batch\['y'\].*non-finite"):
        solve_inner(TVDenoising(), THETA, b, tol=1e-6)


def test_shape_mismatch_between_x_and_y():
    with pytest.raises(ValueError, match=r"x has shape \(2, 1, 4, 4\)"):
        solve_inner(TVDenoising(), THETA, _batch(), tol=1e-6, x0=torch.zeros(2, 1, 4, 4, dtype=DT))


def test_outer_target_shape_mismatch():
    b = _batch()
    b["image"] = torch.zeros(2, 1, 9, 9, dtype=DT)
    with pytest.raises(ValueError, match=r"batch\['image'\] has shape"):
        ImplicitCG()(TVDenoising(), MSEToTarget(), THETA, b, b["y"], tol=1e-6)


def test_non_scalar_theta_for_tv():
    with pytest.raises(ValueError, match="scalar"):
        solve_inner(TVDenoising(), dict(THETA, log_weight=torch.zeros(3, dtype=DT)), _batch(), tol=1e-6)


@pytest.mark.parametrize("tol", [-1e-3, float("nan"), 0.0])
def test_bad_tolerances(tol):
    with pytest.raises(ValueError, match="tol"):
        solve_inner(TVDenoising(), THETA, _batch(), tol=tol)
    with pytest.raises(ValueError, match="tol"):
        ImplicitCG()(TVDenoising(), MSEToTarget(), THETA, _batch(), _batch()["y"], tol=tol)


def test_missing_batch_key():
    with pytest.raises(ValueError, match="key 'y'"):
        solve_inner(TVDenoising(), THETA, {"noisy": torch.zeros(1, 1, 4, 4)}, tol=1e-6)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="max_iter"):
        HOAG(TVDenoising(), MSEToTarget(), max_iter=0)
    with pytest.raises(ValueError, match="n_steps"):
        Unrolled(n_steps=-1)
    with pytest.raises(ValueError, match="tolerance schedule"):
        HOAG(TVDenoising(), MSEToTarget(), tolerance="sometimes")


# ---- the core's input checks (HOAG / MAID / estimators) ------------------------------------
from bilevel import MAID, Bounds, Result  # noqa: E402
from bilevel_problems import ScaledTargetOuter, ShrinkageInner  # noqa: E402

_DT = torch.float64


def _shrink_batch(B=2):
    y = torch.linspace(-1, 1, B * 16, dtype=_DT).reshape(B, 1, 4, 4)
    return {"y": y, "target": 0.6 * y}


class _WrongShape(ShrinkageInner):
    def objective(self, x, theta, batch):
        return super().objective(x, theta, batch).sum()


class _NotDifferentiable(ShrinkageInner):
    def objective(self, x, theta, batch):
        return super().objective(x.detach(), theta, batch)


class _NoBatchDim(ShrinkageInner):
    def init(self, theta, batch):
        return torch.tensor(0.5, dtype=_DT)


def test_objective_of_the_wrong_shape_is_named():
    with pytest.raises(ValueError, match=r"one value per sample, shape \(B,\) = \(2,\); got shape \(\)"):
        HOAG(_WrongShape(), ScaledTargetOuter()).run({"log_reg": torch.tensor(0.0, dtype=_DT)}, _shrink_batch())


def test_objective_not_differentiable_in_x_is_named():
    with pytest.raises(ValueError, match="not differentiable in x"):
        HOAG(_NotDifferentiable(), ScaledTargetOuter()).run({"log_reg": torch.tensor(0.0, dtype=_DT)},
                                                            _shrink_batch())


def test_x_without_batch_dimension_is_named():
    with pytest.raises(ValueError, match="batch dimension"):
        MAID(_NoBatchDim(), ScaledTargetOuter(), mu=0.1).run({"log_reg": torch.tensor(0.0, dtype=_DT)},
                                                             _shrink_batch())


def test_empty_batch_is_named():
    batch = {"y": torch.zeros(0, 1, 4, 4, dtype=_DT), "target": torch.zeros(0, 1, 4, 4, dtype=_DT)}
    with pytest.raises(ValueError, match="batch is empty"):
        HOAG(ShrinkageInner(), ScaledTargetOuter()).run({"log_reg": torch.tensor(0.0, dtype=_DT)}, batch)


def test_theta_whose_exponential_overflows_is_named():
    with pytest.raises(ValueError, match=r"not finite at the initial point for theta = \{'log_reg': 1000"):
        HOAG(ShrinkageInner(), ScaledTargetOuter()).run({"log_reg": torch.tensor(1000.0, dtype=_DT)},
                                                        _shrink_batch())


def test_non_scalar_outer_loss_in_unrolled_is_named():
    class _PerSample(ScaledTargetOuter):
        def forward(self, x, theta, batch):
            return ((x - batch["target"]) ** 2).flatten(1).mean(1)

    with pytest.raises(ValueError, match=r"outer loss must return a scalar tensor, got \(2,\)"):
        Unrolled(n_steps=2, step_size=1.0)(ShrinkageInner(), _PerSample(),
                                           {"log_reg": torch.tensor(0.0, dtype=_DT)},
                                           _shrink_batch(), _shrink_batch()["y"])


def test_nan_in_bounds_is_named():
    with pytest.raises(ValueError, match=r"Bounds.lower\['log_reg'\] is NaN"):
        Bounds(lower={"log_reg": float("nan")})
    with pytest.raises(TypeError, match=r"Bounds.upper\['a'\] must be a real number"):
        Bounds(upper={"a": "high"})


def test_a_huge_initial_step_is_rejected_and_shrunk_not_fatal():
    res = HOAG(ShrinkageInner(), ScaledTargetOuter(), step_size=1e8).run(
        {"log_reg": torch.tensor(2.0, dtype=_DT)}, _shrink_batch())
    assert res.success, res.message
    assert not res.history[1]["accepted"]
    assert float(res.theta["log_reg"]) == pytest.approx(math.log(1 / 0.6 - 1), abs=1e-4)


def test_checkpoint_whose_parent_is_a_file_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        HOAG(ShrinkageInner(), ScaledTargetOuter(), checkpoint=str(blocker / "run" / "ck.pt"))
    with pytest.raises(ValueError, match="is a directory"):
        MAID(ShrinkageInner(), ScaledTargetOuter(), mu=0.1, checkpoint=str(tmp_path))


@pytest.mark.parametrize("content", [b"", b"garbage that is not a zip", "foreign"])
def test_result_load_of_a_bad_file_names_the_file(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.pt"):
        Result.load(str(path))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        Result.load(str(tmp_path / "missing.pt"))
