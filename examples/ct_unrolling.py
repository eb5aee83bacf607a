"""Learned primal-dual, LSPD and sketched LSPD on sparse-view anatomy phantoms, on a CPU.

Trains the three unrolled networks on the same simulated data (64² phantoms of the anatomy
family -- thorax, abdomen, head and random-ellipse layouts with lesions, vessels and texture,
``recon.data.anatomy_phantom``; ``--dataset ellipses`` for ellipses only -- parallel beam with
few angles, optional Poisson low-dose noise), then prints the
analog of Table 3.1 of the reference — FBP, LPD, LSPD, Sk-LSPD: PSNR, SSIM and inference time
per sample, timed side by side — and the PSNR of every method on the real CT slices that ship
with pydicom (CT_small.dcm and two 512² slices; never seen in training; same geometry and
noise, scaled to peak 1 like the phantoms), and checks the targets.  ``--resume`` continues
the network that was training when a run stopped and trains the later ones.  Writes checkpoints,
``table.json`` and ``samples.png`` under ``--out``.

    python examples/ct_unrolling.py                 # the table (about 12 min on one thread)
    python examples/ct_unrolling.py --quick         # smoke run, < 1 minute, in runs/quick/
    python examples/ct_unrolling.py --noise poisson # + low dose (I0 = 7e4)

The recipe: Adam lr 1e-3, batch 2, 64 warm-up steps and cosine decay over 10 epochs of 1024
fresh phantoms for LPD; LSPD and Sk-LSPD then start from the trained LPD's weights (same
parameter shapes; LSPD with one subset is LPD) and are fine-tuned for 2 epochs with the same
schedule (``--warm-start lpd``); zero-initialised last convolutions (every network starts at its
FBP input). Measured at these defaults (one thread, 64 test phantoms): LPD +4.9 dB over FBP on
the anatomy phantoms and +3.7 dB on the real slices, LSPD -0.25 dB and Sk-LSPD -0.6 dB from LPD,
in about 12 minutes; with 4 epochs of LPD +3.9 and +3.3 dB. On ellipses (``--dataset ellipses
--epochs 4 --finetune-epochs 4``: ~10 random ellipses per phantom, 15 angles, about as sparse as
the reference's 90 angles at 512², FBP ~23.5 dB with the best filter on validation) LPD gains
+10.1 dB over FBP, LSPD +0.27 dB and Sk-LSPD -0.32 dB from LPD. Trained from scratch with the
same budget (``--warm-start none``) LSPD and Sk-LSPD end 1.3 and 1.8 dB below LPD there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.checkpoint import load_checkpoint  # noqa: E402
from recon.io import atomic_write  # noqa: E402
from recon.evaluate import add_arguments, load_methods, run, time_methods  # noqa: E402
from recon.metrics import psnr  # noqa: E402
from recon.operators import fbp  # noqa: E402
from recon.models import build_model  # noqa: E402
from recon.scripts import SMOKE_RUN, apply_quick, help_parser  # noqa: E402
from recon.train import TrainConfig, build_setup, default_setup, fit  # noqa: E402

MODELS = ("lpd", "lspd", "sklspd")


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (``--quick``: a tiny smoke configuration)."""
    p = help_parser(__doc__)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n-angles", type=int, default=15,
                   help="parallel-beam angles (15 at 64² is about as sparse as 90 at 512²)")
    p.add_argument("--dataset", choices=("anatomy", "ellipses"), default="anatomy",
                   help="training phantoms: the anatomy family (thorax, abdomen, head and "
                        "random-ellipse layouts with lesions, vessels and texture) or ellipses only")
    p.add_argument("--n-ellipses", type=float, default=10,
                   help="mean number of random ellipses per phantom (--dataset ellipses)")
    p.add_argument("--no-real", action="store_true",
                   help="skip the evaluation on the real CT slices that ship with pydicom")
    p.add_argument("--noise", choices=("none", "poisson", "gaussian"), default="none")
    p.add_argument("--n-train", type=int, default=1024)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--n-test", type=int, default=64)
    p.add_argument("--preset", choices=("digits", "clinical"), default="digits")
    p.add_argument("--subsets", type=int, default=4)
    p.add_argument("--epochs", type=int, default=10,
                   help="epochs of LPD (and of every network with --warm-start none)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=64, help="linear lr warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--repeats", type=int, default=10, help="timed passes per method")
    p.add_argument("--out", default="runs/ct_unrolling")
    p.add_argument("--warm-start", choices=("lpd", "none"), default="lpd",
                   help="start LSPD and Sk-LSPD from the trained LPD's weights (same parameter "
                        "shapes; LSPD with one subset is LPD) or from scratch")
    p.add_argument("--finetune-epochs", type=int, default=2,
                   help="epochs of the warm-started LSPD / Sk-LSPD (2)")
    p.add_argument("--train", nargs="+", choices=MODELS, default=list(MODELS),
                   help="networks to train (the others are read from --out)")
    p.add_argument("--resume", action="store_true", help="continue interrupted trainings")
    p.add_argument("--skip-training", action="store_true", help="evaluate existing checkpoints")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke configuration in runs/quick/ (its numbers are not meaningful)")
    args = p.parse_args(argv)
    args.notes = []
    if args.quick:
        args.notes = apply_quick(p, args, argv, {"image_size": 32, "n_train": 32, "n_val": 8,
                                                 "n_test": 8, "epochs": 1, "finetune_epochs": 1,
                                                 "repeats": 3},
                                 out="runs/quick/ct_unrolling")
    return args


def best_fbp_filter(setup) -> str:
    """The FBP filter with the best validation PSNR: the fairest FBP baseline."""
    operator, val = build_setup(setup, "val")
    scores = {f: float(psnr(fbp(val["sinogram"], operator, filter=f), val["image"]).mean())
              for f in ("ram-lak", "shepp-logan", "hann")}
    print("FBP validation PSNR by filter: " + ", ".join(f"{k} {v:.2f} dB" for k, v in scores.items()))
    return max(scores, key=scores.get)


def train_all(args, setup, out: Path) -> None:
    """Train LPD, LSPD and Sk-LSPD (same data, same seed) into ``out/<model>/``.

    With ``--warm-start lpd`` LSPD and Sk-LSPD start from LPD's best weights and train for
    ``--finetune-epochs``."""
    operator, train = build_setup(setup, "train")
    _, val = build_setup(setup, "val", operator=operator)
    for k, name in enumerate(args.train):
        torch.manual_seed(args.seed)
        extra = {} if name == "lpd" else {"n_subsets": args.subsets}
        model = build_model(name, operator, args.preset, fbp_filter=setup["fbp_filter"],
                            zero_last=True, **extra)
        epochs = args.epochs
        if name != "lpd" and args.warm_start == "lpd":
            model.load_state_dict(load_checkpoint(out / "lpd" / "best.pt")["model"])
            epochs = args.finetune_epochs or args.epochs
        config = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr,
                             warmup_steps=args.warmup, seed=args.seed, progress=True)
        metadata = {"model_name": name, "model_config": model.get_config(), "setup": setup}
        start = time.perf_counter()
        # --resume continues the network that was training when the run stopped; a network
        # that had not started yet (no last.pt) trains afresh, a finished one only reloads
        resume = args.resume and (k == 0 or (out / name / "last.pt").is_file())
        result = fit(model, train, val, config, out / name, resume=resume, metadata=metadata)
        print(f"{name:>7}: best val PSNR {result.best_val_psnr:.2f} dB at epoch "
              f"{result.best_epoch}, {time.perf_counter() - start:.0f} s")


#: real CT slices that ship with pydicom (no download): a 128² slice and two 512² slices
REAL_SLICES = ("CT_small.dcm", "J2K_pixelrep_mismatch.dcm", "693_J2KI.dcm")


def real_slices(setup, operator) -> dict:
    """The slices of :data:`REAL_SLICES` pydicom has, resized to the operator's grid, scaled to
    peak 1 like the training phantoms, and simulated with the training geometry and noise."""
    import warnings

    from pydicom.data import get_testdata_file

    from recon.data import DicomSliceDataset
    from recon.training.experiment import _noise_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: missing optional downloads, implicit VR
        files = [p for p in (get_testdata_file(n) for n in REAL_SLICES) if p is not None]
    data = DicomSliceDataset(files, operator, noise=_noise_model(setup), seed=10_000,
                             fbp_filter=setup["fbp_filter"])
    images = data.make_samples(range(len(files)))["image"].float()
    images = images / images.flatten(1).amax(1).view(-1, 1, 1, 1)
    return {"image": images, **data.simulate(images, range(len(files))),
            "names": [Path(f).name for f in files]}


@torch.no_grad()
def real_slice_rows(methods, real) -> list[dict]:
    """PSNR (dB, peak 1) of FBP and each network on every real slice, and the gain over FBP."""
    rows = []
    for name, fn in methods.items():
        p = psnr(fn(real["sinogram"]).clamp(0, 1), real["image"])
        rows.append({"method": name, "psnr": [float(v) for v in p], "mean": float(p.mean())})
    return rows


def check_targets(rows, batch8) -> list[str]:
    """PSNR gaps to LPD / FBP and time ratios to LPD, each with the level aimed at."""
    r = {row["method"]: row for row in rows}
    lpd = r["LPD"]
    lines = [
        f"LPD - FBP      = {lpd['psnr'] - r['FBP']['psnr']:+.2f} dB   (aim >= +10)",
        f"LSPD - LPD     = {r['LSPD']['psnr'] - lpd['psnr']:+.2f} dB   (aim >= -0.3)",
        f"Sk-LSPD - LPD  = {r['Sk-LSPD']['psnr'] - lpd['psnr']:+.2f} dB   (aim >= -1.5)",
        f"time LSPD/LPD  = {r['LSPD']['ms_per_sample'] / lpd['ms_per_sample']:.2f} at batch 1, "
        f"{batch8['LSPD'] / batch8['LPD']:.2f} at batch 8   (aim <= 0.5)",
        f"time Sk/LPD    = {r['Sk-LSPD']['ms_per_sample'] / lpd['ms_per_sample']:.2f} at batch 1, "
        f"{batch8['Sk-LSPD'] / batch8['LPD']:.2f} at batch 8   (aim <= 0.35)",
    ]
    return lines


def main(argv=None) -> dict:
    """Train (unless ``--skip-training``), evaluate, print the table and the target checks."""
    args = parse_args(argv)
    for line in args.notes:
        print(line)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    extra = {"n_ellipses": args.n_ellipses} if args.dataset == "ellipses" else {}
    setup = default_setup(dataset=args.dataset, image_size=args.image_size,
                          n_angles=args.n_angles, noise=args.noise, n_train=args.n_train,
                          n_val=args.n_val, n_test=args.n_test, **extra)
    setup["fbp_filter"] = best_fbp_filter(setup)
    if not args.skip_training:
        train_all(args, setup, out)
    checkpoints = [str(out / name / "best.pt") for name in MODELS]
    eval_args = argparse.ArgumentParser()
    add_arguments(eval_args)
    eval_args = eval_args.parse_args([*checkpoints, "--n-test", str(args.n_test), "--out",
                                      str(out), "--device", "cpu", "--repeats",
                                      str(args.repeats), "--threads", str(args.threads)])
    family = (f"~{args.n_ellipses:g} ellipses" if args.dataset == "ellipses"
              else "the anatomy family")
    print(f"\nTable 3.1 analog: {args.image_size}² phantoms of {family}, {args.n_angles} angles, noise "
          f"{args.noise}, {args.n_test} test samples, CPU, {args.threads} thread(s); time at "
          f"batch 1")
    report = run(eval_args)
    _, _, methods = load_methods(checkpoints)
    _, test = build_setup(setup, "test", n=8)
    batch8 = time_methods(methods, test["sinogram"][:8], repeats=max(3, args.repeats // 3))
    report["ms_per_sample_batch8"] = {k: 1e3 * v for k, v in batch8.items()}
    print("ms/sample at batch 8: " + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in batch8.items()))
    for line in check_targets(report["rows"], batch8):
        print(line)
    if not args.no_real:
        setup_l, operator, methods = load_methods(checkpoints)
        real = real_slices(setup_l, operator)
        rows = real_slice_rows(methods, real)
        report["real_slices"] = {"names": real["names"], "rows": rows}
        fbp_mean = next(r["mean"] for r in rows if r["method"].lower() == "fbp")
        print(f"\nreal CT slices never seen in training ({', '.join(real['names'])}), same "
              "geometry, peak-1 scaling:")
        for r in rows:
            print(f"  {r['method']:>8}: PSNR {r['mean']:.2f} dB (" + ", ".join(
                f"{v:.2f}" for v in r["psnr"]) + f"), {r['mean'] - fbp_mean:+.2f} dB over FBP")
        print("  target: LPD >= FBP + 5 dB on real slices")
    with atomic_write(out / "table.json", "w") as handle:  # + batch-8 timings, real slices
        handle.write(json.dumps(report, indent=2))
    if args.quick:
        print(SMOKE_RUN)
    return report


if __name__ == "__main__":
    from recon.training.cli import console_main  # bad settings and files: "error: ...", status 2

    sys.exit(console_main(prog="ct_unrolling.py", entry=main))
