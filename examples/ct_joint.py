"""Joint task-adapted CT on a CPU: the analog of Table 3.2 of the reference.

Lesion phantoms with masks (64², 30 parallel-beam angles, Poisson low dose I₀ = 7·10⁴), and
these routes, each over ``--seeds`` seeds (weights and sample order; the data are fixed):

* ``clean``       U-Net on the ground-truth images (ceiling);
* ``sequential``  LPD trained on MSE, then the U-Net on its frozen outputs (floor);
* ``joint_lpd``, ``joint_lspd``, ``joint_sklspd``: reconstructor pretrained on the MSE and U-Net
  pretrained on the clean images (``--pretrain-epochs``, default ``--epochs``; 0 trains from
  scratch), then both trained together on ``(1 − C)·MSE + C·(CE + Dice)`` (at ``--joint-lr``,
  default ``--lr``/10: a fine-tuning). Every network trains as many epochs in every route:
  with pretraining, ``clean`` and both stages of ``sequential`` train
  ``--pretrain-epochs + --epochs`` epochs, as each network of a joint route does;
* ``tv_mse``, ``tv_task``: smoothed-TV CT (``recon.problems.VariationalCT``, Newton-CG from the
  FBP) with θ learned by HOAG for MSE / for the segmentation loss of the clean U-Net of the same
  seed, scored with that U-Net.

Prints Dice (lesion class, mean over test images; ± the 95 % t-interval over seeds), PSNR /
SSIM of x̂, training and inference time, then the C sweep (joint LSPD, first seed; ``C = 0`` is
the sequential route with LSPD) and the joint LSPD / joint LPD training-step time ratio measured
side by side, and the paired Dice differences route − sequential over the seeds (same seed,
same data) with their 95 % t-intervals. Writes ``table.json``, ``samples.png`` and
``loss_curves.png`` under ``--out``. The seeds, the sweep points and the TV rows run as
independent jobs over ``--workers`` processes (:mod:`recon.joint.jobs`; default: the usable
cores), with the numbers of a one-process run (``--workers 1``).

    python examples/ct_joint.py            # the table, 5 seeds (about 10 min on 2 cores)
    python examples/ct_joint.py --quick    # smoke run, < 1 minute, in runs/quick/
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.joint import (JointConfig, JointLoss, JointNet, build_joint_data,  # noqa: E402
                         build_reconstructor, build_segmenter, default_joint_setup,
                         default_model_options, joint_gradients)
from recon.joint.jobs import (JobPool, default_workers, routes_job, sweep_job,  # noqa: E402
                              tv_mse_job, tv_task_job)
from recon.scripts import SMOKE_RUN, apply_quick, help_parser  # noqa: E402
from recon.training.argtypes import float_above, float_in, int_at_least  # noqa: E402
from recon.tasks.summary import t_interval  # noqa: E402

ROUTES = ("clean", "sequential", "joint_lpd", "joint_lspd", "joint_sklspd")
SWEEP = (0.0, 0.1, 0.5, 0.9, 1.0)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (``--quick``: a tiny smoke configuration)."""
    p = help_parser(__doc__)
    pos, nonneg, rate = int_at_least(1), int_at_least(0), float_above(0.0, strict=True)
    p.add_argument("--image-size", type=pos, default=64, help="64 (default) or 128")
    p.add_argument("--n-angles", type=pos, default=30, help="parallel-beam angles (30)")
    p.add_argument("--n-train", type=pos, default=128, help="training images (128)")
    p.add_argument("--n-test", type=pos, default=64, help="test images (64)")
    p.add_argument("--epochs", type=pos, default=7, help="epochs of the joint stage (7)")
    p.add_argument("--batch-size", type=pos, default=4, help="images per step (4)")
    p.add_argument("--lr", type=rate, default=3e-3, help="Adam learning rate (3e-3)")
    p.add_argument("--pretrain-epochs", type=nonneg, default=None,
                   help="joint routes: epochs of pretraining R on MSE and the U-Net on clean "
                        "images before the joint stage (default --epochs; 0: from scratch)")
    p.add_argument("--joint-lr", type=rate, default=None,
                   help="learning rate of the joint stage after pretraining (default --lr / 10: "
                        "a fine-tuning of the two pretrained networks)")
    p.add_argument("--C", type=float_in(0.0, 1.0), default=0.5,
                   help="task weight C in [0, 1] of the joint routes (0.5)")
    p.add_argument("--seeds", type=pos, default=5, help="seeds of every route (5)")
    p.add_argument("--hoag-iter", type=pos, default=8,
                   help="outer iterations of each TV row (8; a row that stops at this cap is "
                        "marked not converged)")
    p.add_argument("--hoag-samples", type=pos, default=8, help="training images HOAG sees (8)")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--no-tv", action="store_true")
    p.add_argument("--threads", type=pos, default=1, help="torch threads per worker process (1)")
    p.add_argument("--workers", type=pos, default=default_workers(),
                   help="worker processes that run the seeds, the sweep and the TV rows side by "
                        "side (default: the usable cores; 1 runs everything in this process)")
    p.add_argument("--out", default="runs/ct_joint", help="output folder (runs/ct_joint)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run (< 1 minute) in runs/quick/ (its numbers are not meaningful)")
    args = p.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"argument --out: {args.out!r} is a file; the results need a folder")
    args.notes = []
    if args.quick:
        args.notes = apply_quick(p, args, argv, {
            "image_size": 32, "n_angles": 16, "n_train": 16, "n_test": 8, "epochs": 1, "seeds": 2,
            "hoag_iter": 2, "hoag_samples": 2}, out="runs/quick/ct_joint")
        args.pretrain_epochs = 1 if args.pretrain_epochs is None else args.pretrain_epochs
    if args.pretrain_epochs is None:
        args.pretrain_epochs = args.epochs
    return args


def _config(args, seed: int, route: str = "joint_lpd") -> JointConfig:
    """The route's training configuration. Every network gets the same number of epochs: a
    joint route trains each of its two networks ``pretrain_epochs + epochs`` epochs
    (pretraining, then the joint stage), so ``clean`` and both stages of ``sequential`` train
    that long too (else the comparison would favour the joint routes by budget alone)."""
    epochs = args.epochs
    if route in ("clean", "sequential") and args.pretrain_epochs > 0:
        epochs = args.pretrain_epochs + args.epochs
    return JointConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, seed=seed,
                       pretrain_epochs=args.pretrain_epochs, joint_lr=args.joint_lr,
                       progress=args.workers == 1)  # workers print one line per finished job


def ci95(values) -> tuple[float, float]:
    """Mean and half-width of the 95 % Student-t interval of the mean (``nan`` for one value;
    :func:`recon.tasks.summary.t_interval`)."""
    iv = t_interval(values)
    return iv["mean"], iv["half_width"]


def paired(rows: dict, base: str = "sequential", key: str = "dice") -> dict:
    """Per-seed differences ``route − base`` of ``key`` for every other route with as many
    seeds (the same seed trains both: a paired design), with the mean and the half-width of
    their 95 % t-interval: ``{route: {"diffs", "mean", "ci95"}}``."""
    ref = [r[key] for r in rows.get(base, [])]
    out = {}
    for route, runs in rows.items():
        if route in (base, "clean") or len(runs) != len(ref) or not ref:
            continue
        diffs = [r[key] - b for r, b in zip(runs, ref)]
        mean, half = ci95(diffs)
        out[route] = {"diffs": diffs, "mean": mean, "ci95": half}
    return out


def format_paired(diffs: dict, base: str = "sequential") -> str:
    """One line per route: mean Dice difference to ``base`` ± its 95 % interval, per seed."""
    lines = [f"paired Dice difference to {base} (same seeds; 95 % t-interval):"]
    for route, d in diffs.items():
        lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
        per = ", ".join(f"{v:+.3f}" for v in d["diffs"])
        verdict = ("> 0" if lo > 0 else "< 0" if hi < 0 else "includes 0")
        lines.append(f"  {route:14s} {d['mean']:+.4f} ± {d['ci95']:.4f}  [{lo:+.3f}, {hi:+.3f}] "
                     f"{verdict}   per seed: {per}")
    return "\n".join(lines)


def step_time_ratio(operator, train, options, batch_size, repeats=6) -> dict:
    """Median joint LSPD / joint LPD training-step seconds, interleaved on the same batch."""
    batch = {k: v[:batch_size] for k, v in train.items()}
    nets = {}
    for name in ("lpd", "lspd"):
        torch.manual_seed(0)
        seg = build_segmenter(options)
        nets[name] = (JointNet(build_reconstructor(name, operator, options), seg), JointLoss(seg, 0.5))
        joint_gradients(*nets[name], batch)  # warm-up (operators, caches)
    times = {"lpd": [], "lspd": []}
    for _ in range(repeats):
        for name, (net, loss) in nets.items():
            t0 = time.perf_counter()
            joint_gradients(net, loss, batch)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"lpd_step_s": med["lpd"], "lspd_step_s": med["lspd"], "ratio": med["lspd"] / med["lpd"]}


def tv_convergence_lines(tv_loops: dict, cap: int) -> list:
    """Whether each TV row's HOAG loop reported success (a row capped at ``--hoag-iter`` is
    not converged: its θ, and so its Dice and PSNR, are not those of the optimum)."""
    lines = []
    for name, label in (("tv_mse", "TV, MSE-learned θ"), ("tv_task", "TV, task-learned θ")):
        runs = [r for r in tv_loops.get(name, []) if r is not None]
        failed = [msg for ok, msg in runs if not ok]
        if not failed:
            lines.append(f"{label}: converged ({len(runs)} loop(s))")
        else:
            lines.append(f"{label}: NOT converged in {len(failed)} of {len(runs)} loop(s) "
                         f"(cap --hoag-iter {cap}): {failed[0]}")
    return lines


def _jobs_total(args) -> int:
    sweeps = 0 if args.no_sweep else sum(C != args.C for C in SWEEP)
    return args.seeds + sweeps + (0 if args.no_tv else 1 + args.seeds)


def _initial_jobs(args, options) -> list:
    """``(tag, job, job arguments)`` of the jobs that need no other job's result."""
    jobs = [] if args.no_tv else [(("TV MSE", None), tv_mse_job, (args.hoag_samples,
                                                                  args.hoag_iter))]
    for seed in range(args.seeds):
        configs = {r: _config(args, seed, r) for r in ROUTES}
        jobs.append((("routes", seed), routes_job, (seed, configs, options, args.C, seed == 0)))
    for C in () if args.no_sweep else SWEEP:
        if C != args.C:
            route = "sequential" if C == 0.0 else "joint_lspd"
            jobs.append((("sweep C", C), sweep_job, (C, _config(args, 0, route), options)))
    return jobs


class _Results:
    """The experiment's results as its jobs finish, in seed order; :meth:`take` returns the
    jobs a result makes ready (the task-learned TV of a seed needs its clean U-Net and the
    MSE-learned θ)."""

    def __init__(self, args, options):
        self.args, self.options, n = args, options, args.seeds
        self.rows = {r: [None] * n for r in ROUTES}
        if not args.no_tv:
            self.rows.update(tv_mse=[None] * n, tv_task=[None] * n)
        self.sweep, self.samples, self.cpu = {}, {}, 0.0
        self.thetas = {} if args.no_tv else {"tv_task": [None] * n}
        #: (success, message) of every TV loop: one for tv_mse, one per seed for tv_task
        self.tv_loops = {} if args.no_tv else {"tv_mse": [None], "tv_task": [None] * n}
        self._tv_mse, self._clean = None, {}

    def take(self, kind: str, key, out: dict) -> list:
        self.cpu += out["job_seconds"]["cpu"]
        self.samples.update(out.get("samples", {}))
        if kind == "sweep C":
            self.sweep[key] = out["row"]
            return []
        if kind == "TV MSE":
            self._tv_mse, self.thetas["tv_mse"] = out, out["theta"]
            self.tv_loops["tv_mse"][0] = (out["converged"], out["message"])
        elif kind == "routes":
            for route, row in out["rows"].items():
                self.rows[route][key] = row
            if not self.args.no_tv:
                self._clean[key] = out["clean_state"]
        else:  # "TV task"
            for name, row in out["rows"].items():
                self.rows[name][key] = row
            self.thetas["tv_task"][key] = out["theta"]
            self.tv_loops["tv_task"][key] = (out["converged"], out["message"])
        return self._ready_tv()

    def _ready_tv(self) -> list:
        if self._tv_mse is None:
            return []
        a, ready = self.args, []
        for seed in list(self._clean):
            ready.append((("TV task", seed), tv_task_job, (
                seed, self._clean.pop(seed), self.options, self._tv_mse, a.hoag_samples,
                a.hoag_iter, seed == 0)))
        return ready

    def sweep_table(self) -> dict:
        """C → scores in the order of :data:`SWEEP` (``--C`` itself is joint LSPD's seed 0)."""
        if self.args.no_sweep:
            return {}
        sweep = {**self.sweep, self.args.C: self.rows["joint_lspd"][0]}
        return {C: sweep[C] for C in SWEEP if C in sweep}


#: the order in which ready jobs start: the task-learned TV rows as soon as they can (they wait
#: for other jobs, and would else be left for the end), the long route jobs before the short
#: sweep points
_PRIORITY = {"TV MSE": 0, "TV task": 1, "routes": 2, "sweep C": 3}


def run_all(args, setup, options) -> _Results:
    """Every job (:mod:`recon.joint.jobs`) over ``--workers`` processes, with one line per
    finished job; at most one job per worker is handed out at a time, the first ready one
    in :data:`_PRIORITY` order."""
    ready, results = _initial_jobs(args, options), _Results(args, options)
    total, t0 = _jobs_total(args), time.perf_counter()
    workers = min(args.workers, total)
    with JobPool(setup, workers, args.threads) as pool:
        pending, finished = {}, 0
        while ready or pending:
            ready.sort(key=lambda item: _PRIORITY[item[0][0]])
            while ready and len(pending) < workers:
                tag, job, rest = ready.pop(0)
                pending[pool.submit(job, *rest)] = tag
            for future in pool.next_done(list(pending)):
                (kind, key), out = pending.pop(future), future.result()
                finished += 1
                print(f"[{finished}/{total}] {kind}{'' if key is None else f' {key}'} done "
                      f"({time.perf_counter() - t0:.0f} s elapsed)", flush=True)
                ready.extend(results.take(kind, key, out))
    return results


def format_table(rows: dict) -> str:
    """Dice ± 95 % CI, PSNR, SSIM, training s, inference ms per route."""
    lines = [f"{'route':14s} {'Dice (95% CI)':>20s} {'PSNR dB':>8s} {'SSIM':>6s} "
             f"{'train s':>8s} {'infer ms':>8s}  n"]
    for route, runs in rows.items():
        d, h = ci95([r["dice"] for r in runs])
        mean = lambda k: statistics.fmean(r[k] for r in runs) if k in runs[0] else float("nan")  # noqa: E731
        lines.append(f"{route:14s} {d:10.4f} ± {h:7.4f} {mean('psnr'):8.2f} {mean('ssim'):6.3f} "
                     f"{mean('train_s'):8.1f} {mean('infer_ms'):8.2f}  {len(runs)}")
    return "\n".join(lines)


def save_png(path: Path, test: dict, samples: dict) -> None:
    """Phantom, x̂, predicted and true mask of the first test image, one row per route."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(samples), 4, figsize=(8, 2 * len(samples)), squeeze=False)
    for ax_row, (route, out) in zip(axes, samples.items()):
        panels = [("phantom", test["image"][0, 0]), (f"{route}: x̂", out["x"][0, 0]),
                  ("predicted mask", out["logits"][0].argmax(0)), ("true mask", test["mask"][0, 0])]
        for ax, (title, img) in zip(ax_row, panels):
            ax.imshow(img.float().numpy(), cmap="gray")
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_loss_curves(path: Path, rows: dict) -> None:
    """Training loss per epoch of every trained route (all seeds; stages one after another:
    pretraining, then the joint stage, or reconstruction, then segmentation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = {r: runs for r, runs in rows.items() if runs and runs[0].get("history")}
    if not trained:
        return
    fig, axes = plt.subplots(1, len(trained), figsize=(3.2 * len(trained), 2.8), squeeze=False)
    for ax, (route, runs) in zip(axes[0], trained.items()):
        for seed, run in enumerate(runs):
            ax.plot([h["loss"] for h in run["history"]], lw=1, label=f"seed {seed}")
        ax.set(title=route, xlabel="epoch (all stages)", yscale="log")
    axes[0][0].set_ylabel("training loss")
    axes[0][0].legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    for line in args.notes:
        print(line)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    setup = default_joint_setup(image_size=args.image_size, n_angles=args.n_angles,
                                n_train=args.n_train, n_test=args.n_test)
    options = (default_model_options(recon_channels=8, recon_iterations=3, unet_channels=4,
                                     unet_depth=2) if args.quick else default_model_options())
    results = run_all(args, setup, options)
    rows, sweep, thetas, samples = (results.rows, results.sweep_table(), results.thetas,
                                    results.samples)
    cpu = results.cpu
    operator, train = build_joint_data(setup, "train")
    _, test = build_joint_data(setup, "test", operator=operator)
    ratio = step_time_ratio(operator, train, options, args.batch_size)
    total = time.perf_counter() - t_start
    print(f"\nTable 3.2 analog ({args.image_size}², {args.n_angles} angles, Poisson I0 = 7e4, "
          f"C = {args.C}, {args.seeds} seeds, {args.workers} worker(s) of {args.threads} "
          f"thread(s)):")
    print(format_table(rows))
    diffs = paired(rows)
    if diffs:
        print("\n" + format_paired(diffs))
    if sweep:
        print("\nC sweep (joint LSPD, seed 0; C = 0: sequential with LSPD):")
        for C, r in sweep.items():
            print(f"  C = {C:3.1f}: Dice {r['dice']:.4f}  PSNR {r['psnr']:.2f} dB  SSIM {r['ssim']:.3f}")
    if thetas:
        print(f"\nTV θ: MSE-learned {thetas['tv_mse']}, task-learned {thetas['tv_task']}")
        print("\n".join(tv_convergence_lines(results.tv_loops, args.hoag_iter)))
    print(f"\njoint LSPD / joint LPD step time: {ratio['lspd_step_s']:.3f} s / "
          f"{ratio['lpd_step_s']:.3f} s = {ratio['ratio']:.2f}")
    workers = min(args.workers, _jobs_total(args))
    print(f"total {total:.0f} s; the jobs used {cpu:.0f} CPU seconds ({cpu / workers:.0f} s per "
          f"worker: the wall time on {workers} idle core(s))")
    if args.quick:
        print(SMOKE_RUN)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "setup": setup, "options": options, "rows": rows,
              "summary": {r: dict(zip(("dice", "ci95"), ci95([x["dice"] for x in v])))
                          for r, v in rows.items()},
              "paired_vs_sequential": diffs,
              "sweep": {str(C): r for C, r in sweep.items()}, "tv_theta": thetas,
              "tv_converged": {k: [x[0] for x in v] for k, v in results.tv_loops.items()},
              "step_time": ratio, "total_seconds": total,
              "cpu_seconds": cpu}
    (out / "table.json").write_text(json.dumps(result, indent=2))
    save_png(out / "samples.png", test, samples)
    save_loss_curves(out / "loss_curves.png", rows)
    return result


if __name__ == "__main__":
    from recon.training.cli import console_main  # bad settings and files: "error: ...", status 2

    sys.exit(console_main(prog="ct_joint.py", entry=main))
