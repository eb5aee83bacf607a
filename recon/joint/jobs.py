"""The Table 3.2 experiment as independent jobs, run side by side in worker processes.

Its work splits into jobs that share nothing but the data, which every process rebuilds from
the same set-up (``build_joint_data`` is deterministic: a few seconds):

* :func:`routes_job` ``(seed)``: every route of :data:`recon.joint.ROUTES` for one seed;
* :func:`sweep_job` ``(C)``: one joint LSPD (or, at ``C = 0``, the sequential route with LSPD);
* :func:`tv_mse_job`: the MSE-learned θ of smoothed-TV CT and its test reconstruction (once);
* :func:`tv_task_job` ``(seed)``: the task-learned θ for that seed's clean U-Net, and both TV
  rows scored with it.

Each job seeds itself (``JointConfig.seed``), so a job gives the same numbers in any process and
in any order. :class:`JobPool` runs them over ``workers`` processes (``spawn``; one torch thread
each by default), or in this process for ``workers = 1``. Small networks on 64² images keep a
core busy with one thread far better than two threads share one network: two processes on two
cores ran the default experiment of ``examples/ct_joint.py`` in 607 s, against 1495 s in one.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import time
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .data import build_joint_data
from .routes import ROUTES, build_segmenter, evaluate_net, predict, run_route
from .trainer import JointConfig, JointNet
from .variational import learn_tv_theta, tv_reconstruct

__all__ = ["JobPool", "default_workers", "routes_job", "sweep_job", "tv_mse_job", "tv_task_job", "scores"]

#: the process's data, built once per process by :func:`_init` (operator, train, test)
_DATA: dict[str, Any] = {}


def _init(setup: Mapping[str, Any], threads: int) -> None:
    """Worker initializer: ``threads`` torch threads and the data of ``setup``."""
    torch.set_num_threads(int(threads))
    operator, train = build_joint_data(setup, "train")
    _, test = build_joint_data(setup, "test", operator=operator)
    _DATA.update(operator=operator, train=train, test=test, setup=dict(setup))


def _data() -> tuple[Any, dict, dict]:
    if not _DATA:
        raise RuntimeError("the joint jobs run inside a JobPool (its processes hold the data)")
    return _DATA["operator"], _DATA["train"], _DATA["test"]


def scores(res: Mapping[str, Any], seconds: float) -> dict:
    """Means of the per-image scores of :func:`recon.joint.evaluate_net`, with the inference
    ms / image and the training seconds."""
    out = {k: float(v.mean()) for k, v in res.items() if torch.is_tensor(v)}
    return {**out, "infer_ms": res["infer_ms"], "train_s": seconds}


def _first(test: Mapping[str, Tensor]) -> dict:
    return {k: v[:1] for k, v in test.items()}


def routes_job(seed: int, configs: Mapping[str, JointConfig], options: Mapping[str, Any],
               C: float, samples: bool = False) -> dict:
    """Train and score every route of ``configs`` (route → config, seed ``seed``).

    Returns ``{"rows": {route: scores + history}, "clean_state": the clean U-Net's weights,
    "samples": {route: first test image's outputs} (only with ``samples``)}``."""
    operator, train, test = _data()
    rows, shots, clean_state = {}, {}, None
    for route in ROUTES:
        if route not in configs:
            continue
        net, info = run_route(route, operator, train, configs[route], options, C=C)
        row = scores(evaluate_net(net, test), info["train_seconds"])
        row["history"] = [{k: r[k] for k in ("epoch", "loss")} for r in info.get("history", [])]
        rows[route] = row
        if route == "clean":
            clean_state = {k: v.detach().clone() for k, v in net.segmenter.state_dict().items()}
        if samples:
            shots[route] = predict(net, _first(test))
    return {"seed": seed, "rows": rows, "clean_state": clean_state, "samples": shots}


def sweep_job(C: float, config: JointConfig, options: Mapping[str, Any]) -> dict:
    """Joint LSPD at task weight ``C`` (``C = 0``: the sequential route with LSPD), scored."""
    operator, train, test = _data()
    route = "sequential" if C == 0.0 else "joint_lspd"
    net, info = run_route(route, operator, train, config, options, C=C, reconstructor="lspd")
    return {"C": C, "row": scores(evaluate_net(net, test), info["train_seconds"])}


def tv_mse_job(n_samples: int, max_iter: int) -> dict:
    """HOAG-learned TV θ for the MSE on the first ``n_samples`` training images, and its
    reconstruction of the test split (``"x"``; the same for every seed, so made once)."""
    operator, train, test = _data()
    sub = {k: v[:n_samples] for k, v in train.items()}
    t0 = time.perf_counter()
    theta, res = learn_tv_theta(operator, sub, "mse", max_iter=max_iter)
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    x, _ = tv_reconstruct(operator, theta, test)
    infer_ms = 1e3 * (time.perf_counter() - t0) / len(test["image"])
    return {"theta": theta, "seconds": seconds, "x": x, "infer_ms": infer_ms,
            "converged": bool(res.success), "message": res.message}


def tv_task_job(seed: int, clean_state: Mapping[str, Tensor], options: Mapping[str, Any],
                tv_mse: Mapping[str, Any], n_samples: int, max_iter: int,
                samples: bool = False) -> dict:
    """The task-learned TV θ for the clean U-Net of ``seed`` (weights ``clean_state``), and the
    rows ``tv_mse`` / ``tv_task``: both reconstructions (``tv_mse``: the result of
    :func:`tv_mse_job`) scored with that U-Net."""
    from recon.metrics import psnr, ssim

    operator, train, test = _data()
    segmenter = build_segmenter(options)
    segmenter.load_state_dict(clean_state)
    segmenter.eval()
    sub = {k: v[:n_samples] for k, v in train.items()}
    t0 = time.perf_counter()
    theta, loop = learn_tv_theta(operator, sub, "task", segmenter, max_iter=max_iter)
    t_task = time.perf_counter() - t0
    t0 = time.perf_counter()
    x_task, _ = tv_reconstruct(operator, theta, test)
    infer_ms = 1e3 * (time.perf_counter() - t0) / len(test["image"])
    rows, shots = {}, {}
    for name, x, secs, ms in (("tv_mse", tv_mse["x"], tv_mse["seconds"], tv_mse["infer_ms"]),
                              ("tv_task", x_task, t_task, infer_ms)):
        net = JointNet(None, segmenter, input_key="x_tv")
        res = evaluate_net(net, dict(test, x_tv=x))
        res.update(psnr=psnr(x, test["image"]), ssim=ssim(x, test["image"]))
        rows[name] = {**scores(res, secs), "infer_ms": ms}
        if samples:
            shots[name] = predict(net, _first(dict(test, x_tv=x)))
    return {"seed": seed, "rows": rows, "theta": theta, "samples": shots,
            "converged": bool(loop.success), "message": loop.message}


def _timed(job: Callable, *args: Any, **kwargs: Any) -> dict:
    """``job(*args, **kwargs)`` with ``"job_seconds": {"wall", "cpu"}`` added to its dict: the
    CPU seconds of this process (every thread) tell the work apart from waiting for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = job(*args, **kwargs)
    out["job_seconds"] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    return out


class _Deferred:
    """The future of :class:`_InlineExecutor`: ``result()`` runs the call (once)."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict):
        self._call, self._done, self._value = (fn, args, kwargs), False, None

    def result(self) -> Any:
        if not self._done:
            fn, args, kwargs = self._call
            self._value, self._done = fn(*args, **kwargs), True
        return self._value


class _InlineExecutor:
    """``submit`` defers the call to this process; it runs when its result is asked for."""

    def submit(self, fn: Callable, *args: Any, **kwargs: Any) -> _Deferred:
        return _Deferred(fn, args, kwargs)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


class JobPool:
    """``workers`` processes that hold the data of ``setup``; ``submit(job, *args)`` returns a
    :class:`concurrent.futures.Future`, and :meth:`next_done` the first finished of a set of
    them. ``workers = 1`` runs every job in this process (whose data and torch thread count it
    then sets), in the order asked for. Use as a context manager."""

    def __init__(self, setup: Mapping[str, Any], workers: int = 1, threads: int = 1):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}")
        self.workers = workers
        if workers == 1:
            _init(setup, threads)
            self._executor: Any = _InlineExecutor()
        else:
            # spawn: a fresh interpreter per worker (fork would copy torch's thread pools)
            context = multiprocessing.get_context("spawn")
            self._executor = cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_init,
                                                    initargs=(dict(setup), threads))

    def submit(self, job: Callable, *args: Any, **kwargs: Any) -> cf.Future:
        """Run ``job(*args, **kwargs)`` (a job of this module, returning a dict) in a worker;
        its result gains ``"job_seconds": {"wall", "cpu"}``."""
        return self._executor.submit(_timed, job, *args, **kwargs)

    def next_done(self, futures: list) -> list:
        """The futures of ``futures`` that have finished (at least one; waits for it). In this
        process: the first of them, run now."""
        if self.workers == 1:
            futures[0].result()
            return [futures[0]]
        done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
        return list(done)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "JobPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def default_workers() -> int:
    """Worker processes for the machine: the cores this process may use (≥ 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores)

