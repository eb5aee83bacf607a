"""Which change to the LPD recipe of the Table 3.1 analog buys PSNR on the anatomy phantoms?

Trains one LPD per variant on the training set of ``examples/ct_unrolling.py`` (64² anatomy
phantoms, 15 angles, no noise, 1024 training phantoms) for the same number of epochs, then
reports for each the training seconds and the gain ``PSNR(LPD) − PSNR(FBP)`` in dB (peak 1,
Hann FBP, outputs clipped to ``[0, 1]``) on the 64 test phantoms and on the real CT slices that
pydicom ships (the example's ``real_slices``), side by side. The variants change one thing of
the example's recipe (5 unrolled iterations, 32 hidden channels, 3×3 kernels, batch 2, Adam at
lr 1e-3 with a cosine schedule):

``base``; ``iters10`` (10 iterations); ``ch64`` (64 channels); ``k5`` (5×5 kernels); ``lr3e-3``;
``lr5e-4``; ``bs8`` (batch 8 at lr 2e-3).

    python benchmarks/lpd_recipe.py [--epochs 3] [--variants base iters10 ...] [--threads 1]
                                    [--out benchmarks/results]

Writes ``<out>/lpd_recipe.json``. ``--quick`` is a smoke run (32² images, 32 phantoms, one
epoch) written to a temporary folder; its numbers mean nothing.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import ct_unrolling  # noqa: E402
from recon.io import atomic_write  # noqa: E402
from recon.metrics import psnr  # noqa: E402
from recon.models import build_model  # noqa: E402
from recon.operators import fbp  # noqa: E402
from recon.scripts import help_parser  # noqa: E402
from recon.train import TrainConfig, build_setup, default_setup, fit  # noqa: E402

#: name -> (model overrides, training overrides), each one change to the example's recipe
VARIANTS = {
    "base": ({}, {}),
    "iters10": ({"n_iterations": 10}, {}),
    "ch64": ({"hidden_channels": 64}, {}),
    "k5": ({"kernel_size": 5}, {}),
    "lr3e-3": ({}, {"lr": 3e-3}),
    "lr5e-4": ({}, {"lr": 5e-4}),
    "bs8": ({}, {"batch_size": 8, "lr": 2e-3}),
}


def gains(model, operator, test, real) -> dict:
    """PSNR of LPD and FBP (dB, peak 1) and the gain, on the test phantoms and the real slices."""
    out = {}
    model.eval()
    with torch.no_grad():
        for name, data in (("test", test), ("real", real)):
            ref = data["image"]
            lpd = float(psnr(model(data["sinogram"]).clamp(0, 1), ref).mean())
            base = float(psnr(fbp(data["sinogram"], operator, filter="hann").clamp(0, 1), ref).mean())
            out[name] = {"lpd": lpd, "fbp": base, "gain": lpd - base}
    return out


def run_variant(name, data, epochs, workdir) -> dict:
    """Train the variant ``name`` from seed 0 and measure it."""
    operator, train, val, test, real = data
    model_kw, train_kw = VARIANTS[name]
    torch.manual_seed(0)
    model = build_model("lpd", operator, "digits", fbp_filter="hann", zero_last=True, **model_kw)
    config = TrainConfig(**{"epochs": epochs, "batch_size": 2, "lr": 1e-3, "warmup_steps": 64,
                            "seed": 0, "progress": False, **train_kw})
    start = time.perf_counter()
    fit(model, train, val, config, Path(workdir) / name, resume=False, metadata={})
    row = {"variant": name, "model": model_kw, "training": train_kw, "epochs": epochs,
           "seconds": time.perf_counter() - start, **gains(model, operator, test, real)}
    print(f"{name:>8}: {row['seconds']:6.0f} s   test {row['test']['gain']:+.2f} dB   "
          f"real slices {row['real']['gain']:+.2f} dB", flush=True)
    return row


def main(argv=None) -> dict:
    p = help_parser(__doc__)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="smoke run; numbers mean nothing")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    size, n_train, epochs = (32, 32, 1) if args.quick else (64, 1024, args.epochs)
    setup = default_setup(dataset="anatomy", image_size=size, n_angles=15, noise="none",
                          n_train=n_train, n_val=8 if args.quick else 32,
                          n_test=8 if args.quick else 64)
    setup["fbp_filter"] = "hann"
    operator, train = build_setup(setup, "train")
    _, val = build_setup(setup, "val", operator=operator)
    _, test = build_setup(setup, "test", operator=operator)
    real = ct_unrolling.real_slices(setup, operator)
    out = Path(tempfile.mkdtemp()) if args.quick else Path(args.out)
    with tempfile.TemporaryDirectory() as workdir:
        rows = [run_variant(v, (operator, train, val, test, real), epochs, workdir)
                for v in args.variants]
    report = {"setup": {k: v for k, v in setup.items() if isinstance(v, (int, float, str))},
              "threads": args.threads, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "lpd_recipe.json", "w") as handle:
        handle.write(json.dumps(report, indent=2))
    print(f"wrote {out / 'lpd_recipe.json'}" + ("  (smoke run: numbers mean nothing)"
                                                if args.quick else ""))
    return report


if __name__ == "__main__":
    main()
