"""Faults that ``recon`` must survive: damaged caches and checkpoints, kill -9 during training
and during a checkpoint write, resumes with changed settings; plus the structure it promises
(no import circles, the linear-operator protocol, the FBP computed once)."""

from __future__ import annotations

import ast
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from recon.checkpoint import load_checkpoint, save_checkpoint
from recon.io import atomic_write, clean_stale_temps, temp_files
from recon.operators import (LinearOperator, ParallelBeamGeometry, RayTransform,
                             adjointness_test, fbp)
from recon.operators import _torch_backend
from recon.training import ResumeMismatchError, TrainConfig, fit, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the ray-transform cache
def _cached(tmp_path, geom):
    _torch_backend._MEMORY_CACHE.clear()
    return RayTransform(geom, cache=tmp_path)


def _damage_truncate(path):
    path.write_bytes(path.read_bytes()[:-40])


def _damage_flip(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def _rewrite(path, **change):
    with np.load(path) as z:
        arrays = {k: z[k] for k in ("indptr", "indices", "data", "shape")}
        checksum = z["checksum"]
    for key, fn in change.items():
        arrays[key] = fn(arrays[key])
    if "indices" in change:  # a well-formed file whose checksum matches its bad indices
        checksum = np.asarray(_torch_backend._checksum(arrays))
    np.savez(path, **arrays, checksum=checksum)


@pytest.mark.parametrize("damage", [
    _damage_truncate,
    _damage_flip,
    lambda p: p.write_bytes(b""),
    lambda p: _rewrite(p, data=lambda d: d * 1.05),  # scaled values, old checksum
    lambda p: _rewrite(p, indices=lambda i: i + 10**6),  # out of range, valid checksum
    lambda p: np.savez(p, indptr=np.zeros(3), indices=np.zeros(2), data=np.zeros(2)),  # no checksum
], ids=["truncated", "bit-flip", "empty", "scaled-values", "indices-out-of-range", "old-format"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, caplog, damage):
    geom = ParallelBeamGeometry((12, 12), 5)
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = _cached(tmp_path, geom)(x)
    (path,) = tmp_path.glob("*.npz")
    damage(path)
    with caplog.at_level(logging.WARNING):
        torch.testing.assert_close(_cached(tmp_path, geom)(x), ref, rtol=0, atol=0)
    assert "is invalid" in caplog.text and "rebuilding" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the rebuilt file is valid again
        torch.testing.assert_close(_cached(tmp_path, geom)(x), ref, rtol=0, atol=0)
    assert caplog.text == "" and not temp_files(path)
    _torch_backend._MEMORY_CACHE.clear()


# ------------------------------------------------------------------ the operator protocol
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ray_transform_subsets_and_coarse_operators_are_adjoint(dtype):
    A = RayTransform(ParallelBeamGeometry((16, 16), 9), cache=False)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    ops = [A, A.T, A.subset(1, 3), A.subset(2, 3), A.coarsen(2), A.coarsen(4).subset(0, 2),
           RayTransform(A.geometry, method="matrix_free")]
    for op in ops:
        assert isinstance(op, LinearOperator)
        assert adjointness_test(op, dtype=dtype) < tol, op


def test_the_dense_test_double_follows_the_protocol():
    from _dense_operator import DenseRayTransform, parallel_angles

    op = DenseRayTransform((8, 8), parallel_angles(5))
    assert isinstance(op, LinearOperator)
    assert adjointness_test(op, dtype=torch.float32) < 1e-5


def test_adjointness_test_detects_a_wrong_adjoint():
    A = RayTransform(ParallelBeamGeometry((8, 8), 4), cache=False)

    class Wrong:
        domain_shape, range_shape = A.domain_shape, A.range_shape
        forward = staticmethod(A.forward)

        @staticmethod
        def adjoint(y):
            return 1.01 * A.adjoint(y)

    assert adjointness_test(Wrong()) > 1e-6  # rounding gives ~1e-17


def test_subset_rows_come_from_the_backend_and_match_the_full_operator():
    A = RayTransform(ParallelBeamGeometry((16, 16), 9), cache=False)
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    y = A(x)  # the full matrix is in memory now; the subset slices its rows
    sub = A.subset(1, 3)
    assert sub._impl._matrix is not None
    torch.testing.assert_close(sub(x), y[..., 1::3, :], rtol=0, atol=0)


# ------------------------------------------------------------------ structure
def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``recon`` that ``path`` imports anywhere (top level or inside functions)."""
    mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if mod.endswith(".__init__"):
        mod = mod[: -len(".__init__")]
        base = mod.split(".")
    else:
        base = mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            out |= {t for t in [target, *names] if t.startswith(package)}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith(package)}
    return out


def test_recon_has_no_import_circles():
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "recon").rglob("*.py")}
    graph = {m: {t for t in _imports(p, "recon") if t in files and t != m} for m, p in files.items()}
    # a package's __init__ re-exports its submodules; only edges between modules count
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_recon_module_is_much_over_400_lines():
    long = {p.name: n for p in (ROOT / "recon").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert set(long) <= {"geometry.py"}, long  # two geometry classes and their conventions


def test_fbp_of_the_data_set_is_the_models_initial_guess():
    from recon.models import LearnedPrimalDual
    from recon.training import build_setup, default_setup

    setup = default_setup(image_size=16, n_angles=8, n_train=4, n_val=2)
    op, data = build_setup(setup, "train")
    torch.manual_seed(0)
    model = LearnedPrimalDual(op, n_iterations=2, hidden_channels=4, n_primal=2, n_dual=2,
                              fbp_filter=setup["fbp_filter"]).eval()
    with torch.no_grad():
        own = model(data["sinogram"])
        given = model(data["sinogram"], data["fbp"])
    torch.testing.assert_close(given, own, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(data["fbp"], fbp(data["sinogram"], op, setup["fbp_filter"]),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ atomic writes
def test_atomic_write_removes_its_temp_file_on_error_and_cleans_stale_ones(tmp_path):
    target = tmp_path / "t.txt"
    with atomic_write(target, "w") as fh:
        fh.write("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as fh:
            fh.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and not temp_files(target)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".t.txt.{dead}.abc123.tmp"
    stale.write_text("left by a killed writer")
    mine = tmp_path / f".t.txt.{os.getpid()}.xyz789.tmp"  # a live writer's file stays
    mine.write_text("in progress")
    assert clean_stale_temps(target) == [stale]
    assert mine.exists()
    mine.unlink()


# ------------------------------------------------------------------ kill -9
_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    from recon.operators import ParallelBeamGeometry, RayTransform
    from recon.models import LearnedPrimalDual
    from recon.training import TrainConfig, fit
    A = RayTransform(ParallelBeamGeometry((8, 8), 4), cache=False)
    img = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    data = {{"sinogram": A(img), "image": img}}
    torch.manual_seed(0)
    model = LearnedPrimalDual(A, n_iterations=2, hidden_channels=4, n_primal=2, n_dual=2,
                              init="zero")
    if {hang_at_save} > 0:  # hang half-way through the n-th checkpoint write
        real_save, count = torch.save, [0]
        def slow_save(obj, f, *a, **k):
            count[0] += 1
            if count[0] == {hang_at_save}:
                f.write(b"PK half a checkpoint")
                f.flush()
                open({ready!r}, "w").close()
                time.sleep(60)
            real_save(obj, f, *a, **k)
        torch.save = slow_save
    config = TrainConfig(epochs=50, batch_size=2, lr=1e-3, save_every=1, progress=False)
    fit(model, data, None, config, {out!r}, resume={resume})
""")


def _tiny_run(out, max_steps, resume):
    sys.path.insert(0, str(ROOT))
    from recon.models import LearnedPrimalDual

    A = RayTransform(ParallelBeamGeometry((8, 8), 4), cache=False)
    img = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = LearnedPrimalDual(A, n_iterations=2, hidden_channels=4, n_primal=2, n_dual=2,
                              init="zero")
    config = TrainConfig(epochs=50, batch_size=2, lr=1e-3, save_every=1, progress=False)
    fit(model, {"sinogram": A(img), "image": img}, None, config, out, resume=resume,
        max_steps=max_steps)
    return model


def _start(out, hang_at_save=0, ready=""):
    code = _SCRIPT.format(root=str(ROOT), out=str(out), resume=False, hang_at_save=hang_at_save,
                          ready=str(ready))
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _wait(predicate, proc, timeout=60.0):
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"training subprocess ended early: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("training subprocess made no progress")
        time.sleep(0.02)


def _saved_step(path):
    try:
        return int(load_checkpoint(path)["step"])
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.parametrize("where", [
    pytest.param("training", marks=pytest.mark.slow),  # same resume path as the one below
    "checkpoint-write"])
def test_kill_9_then_resume_is_bit_exact_and_leaves_no_temp_files(tmp_path, where):
    out, last = tmp_path / "run", tmp_path / "run" / "last.pt"
    ready = tmp_path / "ready"
    if where == "training":
        proc = _start(out)
        _wait(lambda: _saved_step(last) >= 3, proc)
        seen = _saved_step(last)
    else:
        proc = _start(out, hang_at_save=4, ready=ready)
        _wait(ready.exists, proc)
        seen = _saved_step(last)
        assert seen == 3 and temp_files(last)  # killed mid-write: old file intact, temp left
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = _saved_step(last)
    assert saved >= seen  # at most one save interval (one step) lost
    target = saved + 3
    resumed = _tiny_run(out, target, resume=True)
    assert not temp_files(last) and not temp_files(out / "best.pt")
    assert load_checkpoint(last)["step"] == target
    reference = _tiny_run(tmp_path / "ref", target, resume=False)
    for (name, a), b in zip(resumed.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ resume with other settings
_TINY = ["--image-size", "16", "--n-angles", "6", "--n-train", "4", "--n-val", "2",
         "--epochs", "1", "--batch-size", "2", "--iterations", "2", "--channels", "4",
         "--lr", "1e-3", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "lpd"
    main(["train", "--model", "lpd", "--out", str(out), *_TINY])
    return out


@pytest.mark.parametrize("change, listed", [
    (["--lr", "2e-3"], "train_config.lr: 0.001 (saved) != 0.002 (now)"),
    (["--seed", "3"], "train_config.seed: 0 (saved) != 3 (now)"),
    (["--n-angles", "5"], "metadata.setup.n_angles: 6 (saved) != 5 (now)"),
    (["--image-size", "8"], "metadata.setup.image_size: 16 (saved) != 8 (now)"),
    (["--model", "lspd", "--subsets", "2"], "metadata.model_name: 'lpd' (saved) != 'lspd' (now)"),
], ids=["lr", "seed", "n-angles", "image-size", "model"])
def test_resume_refuses_changed_settings_and_lists_them(finished_run, change, listed):
    before = finished_run.joinpath("last.pt").read_bytes()
    with pytest.raises(ResumeMismatchError, match="cannot resume") as info:
        main(["train", "--model", "lpd", "--out", str(finished_run), "--resume", *_TINY, *change])
    assert listed in str(info.value)
    assert finished_run.joinpath("last.pt").read_bytes() == before


def test_resume_allows_device_progress_and_save_every_to_change(finished_run):
    result = main(["train", "--model", "lpd", "--out", str(finished_run), "--resume", *_TINY,
                   "--save-every", "5", "--device", "cpu"])
    assert result.step == 2


def test_fit_resume_lists_every_difference(tmp_path):
    A = RayTransform(ParallelBeamGeometry((8, 8), 4), cache=False)
    img = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    data = {"sinogram": A(img), "image": img}
    from recon.models import LearnedPrimalDual

    def model():
        return LearnedPrimalDual(A, n_iterations=1, hidden_channels=2, n_primal=2, n_dual=2,
                                 init="zero")

    fit(model(), data, None, TrainConfig(epochs=1, batch_size=2, progress=False), tmp_path,
        metadata={"setup": {"noise": "none"}})
    with pytest.raises(ResumeMismatchError) as info:
        fit(model(), data, None, TrainConfig(epochs=1, batch_size=2, lr=1e-4, betas=(0.9, 0.99),
                                             progress=False), tmp_path, resume=True,
            metadata={"setup": {"noise": "poisson"}})
    text = str(info.value)
    assert "train_config.lr" in text and "train_config.betas" in text
    assert "metadata.setup.noise: 'none' (saved) != 'poisson' (now)" in text
