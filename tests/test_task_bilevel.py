"""Task-driven bilevel learning: hypergradients of task losses against central finite
differences (float64, tiny networks), HOAG / MAID learning θ of TVDenoising for a task, and
fine-tuning through ``param_optimizer``."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from bilevel import HOAG, MAID, ImplicitCG, solve_inner
from recon.models import UNet
from recon.problems import TVDenoising
from recon.tasks import ClassificationLoss, SegmentationLoss, TaskLoss, TaskOperator

DT = torch.float64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_classifier(k=3):
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(2 * 4 * 4, k))


def _problem(kind, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clean = torch.rand(2, 1, 8, 8, generator=g, dtype=DT)
    y = clean + 0.2 * torch.randn(clean.shape, generator=g, dtype=DT)
    if kind == "segmentation":
        net = UNet(1, 3, base_channels=2, depth=1, norm="group").to(DT)   # no dead ReLUs
        labels = torch.randint(0, 3, (2, 8, 8), generator=g)
        labels[0, 0, :3] = 255
        loss = SegmentationLoss(ignore_index=255)
    else:
        net = _tiny_classifier().to(DT)
        labels = torch.tensor([0, 2])
        loss = ClassificationLoss()
    return TaskLoss(TaskOperator(net), loss), {"y": y, "image": clean, "label": labels}


def _upper(outer, theta, batch):
    x = solve_inner(TVDenoising(), theta, batch, tol=1e-13).x
    with torch.no_grad():
        return float(outer(x, theta, batch))


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), lw=st.floats(-4.0, -1.0), ls=st.floats(-5.0, -2.0),
       kind=st.sampled_from(["segmentation", "classification"]))
def test_task_hypergradient_matches_central_differences(seed, lw, ls, kind):
    outer, batch = _problem(kind, seed)
    theta = {"log_weight": torch.tensor(lw, dtype=DT), "log_smoothing": torch.tensor(ls, dtype=DT)}
    inner = TVDenoising()
    x = solve_inner(inner, theta, batch, tol=1e-13).x
    hg = ImplicitCG(max_iter=500)(inner, outer, theta, batch, x, tol=1e-13)
    assert hg.norm() > 1e-7          # a real signal, not two zeros agreeing
    h = 1e-5
    for name in theta:
        plus = {**theta, name: theta[name] + h}
        minus = {**theta, name: theta[name] - h}
        fd = (_upper(outer, plus, batch) - _upper(outer, minus, batch)) / (2 * h)
        assert float(hg.theta_grad[name]) == pytest.approx(fd, rel=1e-5, abs=1e-9), name


class _LevelSegmenter(nn.Module):
    """Logits ``z_k = −s (x − c_k)²``: the class of the nearest grey level ``c_k``."""

    def __init__(self):
        super().__init__()
        self.levels = nn.Parameter(torch.tensor([1 / 6, 1 / 2, 5 / 6], dtype=DT))
        self.head = nn.Parameter(torch.tensor(30.0, dtype=DT))

    def forward(self, x):
        return -self.head * (x - self.levels.view(1, -1, 1, 1)) ** 2


def _blocks(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (3, 4, 4), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    clean = ((2 * labels + 1) / 6.0).to(DT)[:, None]
    return {"y": clean + 0.25 * torch.randn(clean.shape, generator=g, dtype=DT), "image": clean,
            "label": labels}


def test_hoag_and_maid_lower_the_task_loss_and_finetuning_moves_only_selected_layers():
    batch = _blocks(3)
    outer = TaskLoss(TaskOperator(_LevelSegmenter()), SegmentationLoss())
    theta0 = {"log_weight": torch.tensor(-4.0, dtype=DT), "log_smoothing": torch.tensor(-4.0, dtype=DT)}
    start = _upper(outer, theta0, batch)
    for cls in (HOAG, MAID):
        res = cls(TVDenoising(), outer, max_iter=6).run(theta0, batch)
        assert _upper(outer, res.theta, batch) < 0.9 * start, cls.__name__
    tuned = TaskOperator(_LevelSegmenter(), finetune=["head"])
    outer_ft = TaskLoss(tuned, outer.loss)
    levels0 = tuned.network.levels.detach().clone()
    opt = torch.optim.Adam(outer_ft.trainable_parameters().values(), lr=1e-1)
    res = HOAG(TVDenoising(), outer_ft, max_iter=4, param_optimizer=opt).run(theta0, batch)
    assert torch.equal(tuned.network.levels, levels0)
    assert float(tuned.network.head.detach()) != 30.0
    assert set(res.params) == {"task.network.head"}


def test_task_loss_feeds_a_float32_network_from_a_float64_inner_problem():
    outer, batch = _problem("classification", 1)
    outer.task.network.float()
    x = batch["y"].clone().requires_grad_(True)
    loss = outer(x, {}, batch)
    (g,) = torch.autograd.grad(loss, x)
    assert loss.dtype == torch.float32 and g.dtype == DT
