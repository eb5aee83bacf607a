"""Quickstart: learn the smoothed-TV denoising hyperparameters with the quasi-Newton bilevel loop —
for the pixels, and for the task that follows.

    python examples/quickstart.py [--iters 100] [--n-train 16] [--sigma 0.1] [--out outputs/quickstart]
    python examples/quickstart.py --no-task          # the first part only

Lower level (per image b):  x̂_b(θ) = argmin_x mean((x − y_b)²) + e^{θ₀} mean sqrt(|∇x|² + e^{θ₁})
Upper level:                min_θ mean((x̂(θ) − x*)²)   (MSE to the clean images)

Images are 64×64 grey patches of scikit-image's bundled pictures with Gaussian noise σ; θ is
learned on a training set and evaluated on held-out patches. Prints a table (noisy, TV at the
initial θ, TV at the learned θ: PSNR and SSIM) and writes a PNG of the upper loss per iteration
and a PNG of sample images.

Second part (task-adapted, reference §3.4): a small CNN ``T*`` is trained on clean 32×32
scikit-learn digits; the digits get noise σ = ``--task-sigma`` (0.5). θ is learned twice with
the quasi-Newton loop on ``--task-n-train`` noisy training digits — for the MSE to the clean digits, and then,
starting from that θ, for the classification loss ``CE(T*(x̂(θ)), s)`` — and both are scored by T*'s accuracy on 450 held-out
digits, next to T* on the clean and on the noisy digits.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from bilevel import Bounds, QuasiNewton, solve_inner
from recon.data.natural_images import denoising_batch
from recon.losses import MSEToTarget
from recon.metrics import psnr, ssim
from recon.problems import TVDenoising


def mean_metrics(x: torch.Tensor, clean: torch.Tensor):
    """Mean PSNR / SSIM over a batch, data range 1 (images live in [0, 1]; x clipped to it)."""
    x = x.detach().clamp(0, 1)
    return float(psnr(x, clean, data_range=1.0).mean()), float(ssim(x, clean, data_range=1.0).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--iters", type=int, default=100, help="outer iterations (a cap: the loop stops by itself)")
    ap.add_argument("--n-train", type=int, default=16)
    ap.add_argument("--n-test", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--sigma", type=float, default=0.1, help="noise standard deviation (images in [0, 1])")
    ap.add_argument("--out", default="outputs/quickstart", help="folder for PNG / JSON outputs")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-task", action="store_true", help="skip the task-adapted part")
    ap.add_argument("--task-sigma", type=float, default=0.5,
                    help="noise of the task part (at 0.3 the two θ tie; at 0.5 they differ)")
    ap.add_argument("--task-n-train", type=int, default=100, help="noisy digits θ is learned on")
    ap.add_argument("--task-iters", type=int, default=60,
                    help="outer iterations per route (a cap: the loop stops by itself)")
    ap.add_argument("--task-epochs", type=int, default=3, help="epochs of T* on clean digits")
    ap.add_argument("--task-n-test", type=int, default=450, help="held-out digits (at most 450)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    dt = torch.float64

    train = denoising_batch(args.n_train, args.size, args.sigma, seed=0, dtype=dt)
    test = denoising_batch(args.n_test, args.size, args.sigma, seed=1000, dtype=dt)
    inner, outer = TVDenoising(), MSEToTarget()
    theta0 = {"log_weight": torch.tensor(-5.0, dtype=dt), "log_smoothing": torch.tensor(-3.0, dtype=dt)}

    loop = QuasiNewton(inner, outer, max_iter=args.iters,
                bounds=Bounds(lower={"log_smoothing": -12.0}, upper={"log_smoothing": 2.0}),
                progress=not args.no_progress)
    t0 = time.perf_counter()
    res = loop.run(theta0, train)
    seconds = time.perf_counter() - t0

    rows = [("noisy", *mean_metrics(test["y"], test["image"]))]
    recon_test = {}
    for label, theta in (("TV, initial θ", theta0), ("TV, learned θ", res.theta)):
        x = solve_inner(inner, theta, test, tol=1e-9).x
        recon_test[label] = x
        rows.append((label, *mean_metrics(x, test["image"])))

    th = {k: float(v) for k, v in res.theta.items()}
    print(f"\nQuasiNewton: success={res.success}, {res.n_iter} outer iterations in {seconds:.1f} s ({res.message}); "
          f"learned θ = {th} (weight e^θ₀ = {np.exp(th['log_weight']):.3g}, "
          f"smoothing e^θ₁ = {np.exp(th['log_smoothing']):.3g})")
    print(f"upper loss (train MSE): {res.history[0]['upper_loss']:.3e} → {res.upper_loss:.3e}\n")
    print(f"{'held-out test set (' + str(args.n_test) + ' images)':<34}{'PSNR [dB]':>10}{'SSIM':>8}")
    for name, p, s in rows:
        print(f"{name:<34}{p:>10.2f}{s:>8.3f}")

    os.makedirs(args.out, exist_ok=True)
    loss_png = os.path.join(args.out, "upper_loss.png")
    res.history.plot(loss_png)
    _save_samples(os.path.join(args.out, "samples.png"), test, recon_test)
    task_rows = None if args.no_task else task_part(args)
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump({"theta": th, "seconds": seconds, "table": rows, "history": res.history.as_dict(),
                   "task_table": task_rows}, f, indent=1)
    print(f"\nwrote {loss_png}, {os.path.join(args.out, 'samples.png')} and result.json")
    return res, rows


def task_part(args):
    """θ learned for MSE vs θ learned for the classification loss, both scored on the task."""
    from recon.data.standins import add_gaussian_noise, digit_classification
    from recon.tasks import ClassificationLoss, TaskLoss, TaskOperator, classification_accuracy
    from recon.tasks.pretrain import build_task_network, predict, pretrain

    torch.manual_seed(0)
    net = build_task_network({"kind": "small_cnn", "in_channels": 1, "num_classes": 10, "width": 16})
    clean_train = digit_classification(None, 32, "train")
    test = digit_classification(min(args.task_n_test, 450), 32, "test", seed=4)
    pretrain(net, clean_train, ClassificationLoss(), epochs=args.task_epochs, batch_size=32, lr=3e-3,
             progress=not args.no_progress)
    pick = torch.randperm(len(clean_train["label"]), generator=torch.Generator().manual_seed(1))
    pick = pick[:args.task_n_train]
    x_tr = clean_train["image"][pick].double()
    train = {"image": x_tr, "label": clean_train["label"][pick],
             "y": add_gaussian_noise(x_tr, args.task_sigma, seed=2)}
    y_test = add_gaussian_noise(test["image"].double(), args.task_sigma, seed=3)
    inner = TVDenoising()
    theta0 = {"log_weight": torch.tensor(-4.0, dtype=torch.float64),
              "log_smoothing": torch.tensor(-4.0, dtype=torch.float64)}
    bounds = Bounds(lower={"log_smoothing": -12.0}, upper={"log_smoothing": 2.0})

    def acc(images):
        return classification_accuracy(predict(net, images.float()), test["label"])

    rows = [("T* on clean digits", acc(test["image"]), None), ("T* on noisy digits", acc(y_test), None)]
    start = theta0                      # the task route continues from the MSE-learned θ
    for label, outer in (("TV, θ learned for MSE", MSEToTarget()),
                         ("TV, θ learned for the task", TaskLoss(TaskOperator(net), ClassificationLoss()))):
        r = QuasiNewton(inner, outer, max_iter=args.task_iters, bounds=bounds,
                 progress=not args.no_progress).run(start, train)
        start = r.theta
        x = solve_inner(inner, r.theta, {"y": y_test}, tol=1e-7).x
        rows.append((label, acc(x), {k: round(float(v), 3) for k, v in r.theta.items()}))
        print(f"{label}: {r.n_iter} iterations, success={r.success} ({r.message[:70]})")
    print(f"\ntask: classify 32×32 digits with noise σ = {args.task_sigma} "
          f"(T* trained on clean digits; {len(test['label'])} held-out digits)")
    print(f"{'':<34}{'accuracy':>10}   θ")
    for name, a, th in rows:
        print(f"{name:<34}{a:>10.3f}   {th or ''}")
    return rows


def _save_samples(path, test, recon_test, k=3):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [("clean", test["image"]), ("noisy", test["y"])] + list(recon_test.items())
    fig, axes = plt.subplots(k, len(cols), figsize=(2.2 * len(cols), 2.2 * k))
    for i in range(k):
        for j, (name, imgs) in enumerate(cols):
            axes[i, j].imshow(imgs[i, 0].clamp(0, 1).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_axis_off()
            if i == 0:
                axes[i, j].set_title(name, fontsize=9)
    fig.tight_layout()
    from bilevel.history import save_figure
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
