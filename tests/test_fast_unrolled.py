"""FastInference / FastTrainStep: option checks, eager fp32 equality, bf16-autocast and
channels-last tolerances on the CPU, the compile fallback; CUDA-graph runs only with CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from recon.models import (BF16_RTOL, LSPD, FastInference, FastTrainStep, LearnedPrimalDual,
                          SketchedLSPD)
from recon.operators import ParallelBeamGeometry, RayTransform

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _setup(tmp_path_factory, monkeypatch, one_torch_thread):
    monkeypatch.setenv("RECON_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ray_cache"))


def _operator(method="fused", check_finite=True):
    return RayTransform(ParallelBeamGeometry((16, 16), 8), method=method, check_finite=check_finite)


def _nets(op):
    torch.manual_seed(0)
    kw = dict(hidden_channels=8, n_primal=2, n_dual=2, zero_last=False)  # random blocks: bf16 differs
    return {"LPD": LearnedPrimalDual(op, 2, **kw), "LSPD": LSPD(op, 2, n_subsets=2, **kw),
            "Sk-LSPD": SketchedLSPD(op, 3, n_subsets=2, n_unsketched=1, **kw)}


def _data(op, batch=2):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 1, 16, 16, generator=gen)
    return op(x), x


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_fp32_eager_equals_model_and_bf16_channels_last_within_tolerance():
    op = _operator()
    y, _ = _data(op)
    for name, net in _nets(op).items():
        net.eval()
        with torch.no_grad():
            ref = net(y)
        torch.testing.assert_close(FastInference(net)(y), ref, rtol=0, atol=0)
        bf16 = FastInference(copy.deepcopy(net), precision="bf16")(y)
        assert bf16.dtype == torch.float32 and 0 < _rel(bf16, ref) < BF16_RTOL, name
        cl = FastInference(copy.deepcopy(net), channels_last=True)(y)
        assert _rel(cl, ref) < 1e-5, name


def test_train_step_equals_manual_step_and_bf16_loss_is_close():
    op = _operator()
    y, x = _data(op)
    net = _nets(op)["LSPD"]
    twin = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    step = FastTrainStep(net, opt)
    loss = step(y, x)
    opt2 = torch.optim.Adam(twin.parameters(), lr=1e-3)
    ref = F.mse_loss(twin(y), x)
    ref.backward()
    opt2.step()
    torch.testing.assert_close(loss, ref.detach(), rtol=0, atol=0)
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    bf16 = FastTrainStep(copy.deepcopy(twin), torch.optim.SGD(twin.parameters(), lr=0.0),
                         precision="bf16")
    fp32 = F.mse_loss(twin(y), x).detach()
    assert abs(float(bf16(y, x)) - float(fp32)) < 2 * BF16_RTOL * float(fp32)


def test_compile_failure_warns_and_falls_back_to_eager(monkeypatch):
    op = _operator()
    y, _ = _data(op)
    net = _nets(op)["LPD"].eval()

    def broken(model, mode=None):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    fast = FastInference(net, compile=True)
    with pytest.warns(UserWarning, match="torch.compile of LearnedPrimalDual failed.*eagerly"):
        out = fast(y)
    with torch.no_grad():
        torch.testing.assert_close(out, net(y), rtol=0, atol=0)


def test_bad_options_name_the_argument():
    op = _operator()
    net = _nets(op)["LPD"]
    opt = torch.optim.Adam(net.parameters())
    with pytest.raises(ValueError, match="`precision` must be one of"):
        FastInference(net, precision="fp16")
    with pytest.raises(TypeError, match="`compile` must be a bool"):
        FastInference(net, compile="yes")
    with pytest.raises(ValueError, match="`warmup` must be an int >= 1"):
        FastInference(net, warmup=0)
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        FastInference(lambda y: y)
    with pytest.raises(ValueError, match="`cuda_graph`=True needs the model on a CUDA device, got cpu"):
        FastInference(net, cuda_graph=True)
    with pytest.raises(TypeError, match="`optimizer` must be a torch.optim.Optimizer"):
        FastTrainStep(net, "adam")
    with pytest.raises(ValueError, match="capturable=True"):
        FastTrainStep(net, opt, cuda_graph=True)
    random = LSPD(op, 2, n_subsets=2, subset_order="random", hidden_channels=4).train()
    with pytest.raises(ValueError, match="freeze the random subset order"):
        FastTrainStep(random, torch.optim.SGD(random.parameters(), lr=0.1), cuda_graph=True)
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        FastTrainStep(lambda y: y, opt)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_graph_inference_and_training_match_eager():
    op = _operator(check_finite=False)
    y, x = _data(op)
    y, x = y.cuda(), x.cuda()
    with pytest.raises(ValueError, match="check_finite=False"):
        FastInference(_nets(_operator())["LPD"].cuda(), cuda_graph=True)
    for name, net in _nets(op).items():
        net = net.cuda().eval()
        with torch.no_grad():
            ref = net(y)
        graph = FastInference(net, cuda_graph=True)
        torch.testing.assert_close(graph(y), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(graph(y * 2), FastInference(net)(y * 2), rtol=1e-5, atol=1e-6)
        net.train()
        twin = copy.deepcopy(net)
        step = FastTrainStep(net, torch.optim.Adam(net.parameters(), lr=1e-3, capturable=True),
                             cuda_graph=True)
        eager = FastTrainStep(twin, torch.optim.Adam(twin.parameters(), lr=1e-3, capturable=True))
        for _ in range(3):
            torch.testing.assert_close(step(y, x), eager(y, x), rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_compiled_inference_and_training_match_eager_on_cpu():
    """torch.compile through the fused operator (torch reference on the CPU): same numbers."""
    op = _operator(check_finite=False)
    y, x = _data(op)
    net = _nets(op)["Sk-LSPD"].eval()
    with torch.no_grad():
        ref = net(y)
    fast = FastInference(net, compile=True)
    torch.testing.assert_close(fast(y), ref, rtol=1e-5, atol=1e-6)
    assert fast.options.fn is not fast.options.model  # compiled, not the eager fallback
    twin = copy.deepcopy(net).train()
    net.train()
    step = FastTrainStep(net, torch.optim.SGD(net.parameters(), lr=1e-2), compile=True)
    eager = FastTrainStep(twin, torch.optim.SGD(twin.parameters(), lr=1e-2))
    for _ in range(2):
        torch.testing.assert_close(step(y, x), eager(y, x), rtol=1e-5, atol=1e-7)
