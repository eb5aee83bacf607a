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
