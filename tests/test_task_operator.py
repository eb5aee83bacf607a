"""The core interface ``bilevel.TaskOperator``, its network implementation
``recon.tasks.TaskOperator``, the layering of the core, and ``TaskLoss`` given a raw network."""
import ast
import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import bilevel
from bilevel import HOAG
from recon.problems import TVDenoising
from recon.tasks import ClassificationLoss, TaskLoss
from recon.tasks import TaskOperator as NetworkTaskOperator

DT = torch.float64
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Classifier(bilevel.TaskOperator):
    """Features (conv, batch-norm, dropout) frozen, ``head`` trainable."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(),
                                      nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5))
        self.freeze()

    def finetunes(self, name):
        return name == "head" or name.startswith("head.")

    def forward(self, x):
        return self.head(self.features(x))


def test_bilevel_exports_an_abstract_task_operator():
    assert "TaskOperator" in bilevel.__all__ and bilevel.TaskOperator is bilevel.problem.TaskOperator
    with pytest.raises(TypeError, match="abstract"):
        bilevel.TaskOperator()

    class OnlyForward(bilevel.TaskOperator):
        def forward(self, x):
            return x

    with pytest.raises(TypeError, match="finetunes"):
        OnlyForward()


def test_declared_parameters_train_and_the_frozen_rest_stays_in_eval_mode():
    task = _Classifier()
    assert task.trainable_names == ["head.0.weight", "head.0.bias"]
    assert task.frozen_names == ["features.0.weight", "features.0.bias", "features.1.weight",
                                 "features.1.bias"]
    assert set(task.finetuned_parameters()) == set(task.trainable_names)
    task.train()
    assert task.training and task.head.training and task.head[1].training
    assert not any(m.training for m in task.features.modules())
    bn = task.features[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone())
    out = task(torch.randn(4, 1, 6, 6))
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    out.sum().backward()
    assert task.head[0].weight.grad is not None and task.features[0].weight.grad is None
    task.eval()
    assert not any(m.training for m in task.modules())


def test_the_network_operator_implements_the_core_interface():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3))
    net(torch.zeros(1, 1, 5, 5))
    task = NetworkTaskOperator(net, finetune=["3"])
    assert isinstance(task, bilevel.TaskOperator) and task.task_network() is net
    assert task.finetunes("3") and task.finetunes("3.weight") and not task.finetunes("1")
    assert not task.finetunes("30.weight")          # a prefix matches whole name parts only
    assert task.trainable_names == ["3.weight", "3.bias"]
    task.train()
    assert net[3].training and not net[1].training and not net.training


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_the_core_imports_nothing_of_recon():
    bad = {f"{p.name}: {m}" for p in (ROOT / "bilevel").rglob("*.py") for m in _imports(p)
           if m == "recon" or m.startswith("recon.")}
    assert not bad, bad
    code = ("import sys, bilevel; bad = sorted(m for m in sys.modules if m.split('.')[0] == 'recon');"
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


# ----- TaskLoss given a raw network ---------------------------------------------------------------
def _bn_classifier():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(),
                        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).to(DT)
    bn = net[1]
    with torch.no_grad():          # "pretrained" statistics, far from any batch's own
        bn.running_mean.copy_(torch.tensor([0.3, -0.2], dtype=DT))
        bn.running_var.copy_(torch.tensor([2.0, 0.5], dtype=DT))
    return net


def _batch():
    g = torch.Generator().manual_seed(4)
    clean = torch.rand(3, 1, 8, 8, generator=g, dtype=DT)
    return {"y": clean + 0.2 * torch.randn(clean.shape, generator=g, dtype=DT),
            "image": clean, "label": torch.tensor([0, 2, 1])}


def _learn(task):
    theta0 = {"log_weight": torch.tensor(-3.0, dtype=DT),
              "log_smoothing": torch.tensor(-3.0, dtype=DT)}
    return HOAG(TVDenoising(), TaskLoss(task, ClassificationLoss()), max_iter=3).run(theta0, _batch())


def test_task_loss_puts_a_raw_network_in_training_mode_into_eval_mode_with_a_warning():
    batch = _batch()
    probe = _bn_classifier().train()
    probe(batch["y"])               # what the loss would do in training mode: statistics move
    assert not torch.allclose(probe[1].running_mean, _bn_classifier()[1].running_mean)

    raw = _bn_classifier().train()
    stats = {k: v.clone() for k, v in raw[1].state_dict().items()}
    with pytest.warns(UserWarning, match=r"training mode.*batch-norm.*\['1'\].*eval mode"):
        res = _learn(raw)
    for k, v in raw[1].state_dict().items():
        assert torch.equal(v, stats[k]), k      # running mean / var / batch count untouched
    assert not any(m.training for m in raw.modules())

    reference = _bn_classifier().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # an eval-mode network is taken without a warning
        ref = _learn(reference)
    assert res.theta.keys() == ref.theta.keys()
    for k in ref.theta:
        assert torch.equal(res.theta[k], ref.theta[k]), k
    assert res.n_iter == ref.n_iter and res.theta["log_weight"] != -3.0


def test_task_loss_keeps_the_trainable_parameters_of_a_raw_network():
    net = _bn_classifier().eval()
    for p in net[0].parameters():
        p.requires_grad_(False)
    outer = TaskLoss(net, ClassificationLoss())
    assert isinstance(outer.task, bilevel.TaskOperator) and outer.task.network is net
    assert set(outer.trainable_parameters()) == {
        f"task.network.{n}" for n in ("1.weight", "1.bias", "5.weight", "5.bias")}
    tuned = NetworkTaskOperator(copy.deepcopy(net), finetune=["5"])
    assert TaskLoss(tuned, ClassificationLoss()).task is tuned      # operators pass through
