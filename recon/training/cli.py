r"""Command line of the unrolled-reconstruction experiments (``python -m recon.train``).

::

    python -m recon.train train --model lpd --image-size 64 --n-angles 30 --out runs/lpd
    python -m recon.train train --model lpd ... --out runs/lpd --resume   # same settings only
    python -m recon.train evaluate runs/lpd/best.pt runs/lspd/best.pt --out runs/table
    torchrun --nproc_per_node 4 -m recon.train train --model lpd ... --out runs/lpd  # DDP

``train`` builds the geometry, the phantom data (anatomy-like by default, see ``--dataset``;
sparse view, optional Poisson noise) and the model (:mod:`recon.training.experiment`) and
runs :func:`recon.training.fit`;
``evaluate`` rebuilds everything from the checkpoints (:func:`recon.training.load_methods`),
prints the table and writes ``table.json`` and ``samples.png``.  Sizes, counts and rates are
checked when the arguments are parsed (``argparse`` exits with status 2 naming the option).
"""

from __future__ import annotations

import argparse
import json
import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..io import atomic_write
from ..scripts import plain_text
from .argtypes import float_above, float_in, int_at_least
from .evaluation import evaluate_methods, format_table, load_methods, save_samples_png
from .experiment import build_setup, default_setup
from .loop import TrainConfig, TrainResult, fit

__all__ = ["add_train_arguments", "add_evaluate_arguments", "train_from_args", "run_evaluate",
           "main", "console_main"]


_positive_float = float_above(0.0, strict=True)
_nonnegative_float = float_above(0.0, strict=False)
_finite_float = float_in()
_beta = float_in(0.0, 1.0, strict_high=True)


_POS, _NONNEG = int_at_least(1), int_at_least(0)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m recon.train train``."""
    d = default_setup()
    g = parser.add_argument_group("data and geometry")
    g.add_argument("--dataset", choices=("ellipses", "anatomy", "digits"), default=d["dataset"])
    g.add_argument("--image-size", type=_POS, default=d["image_size"])
    g.add_argument("--n-angles", type=_POS, default=d["n_angles"],
                   help="parallel-beam angles in [0, pi) (sparse view: few)")
    g.add_argument("--n-detectors", type=_POS, default=None)
    g.add_argument("--noise", choices=("none", "poisson", "gaussian"), default=d["noise"])
    g.add_argument("--photons", type=_positive_float, default=d["photons"], help="Poisson I0 (7e4)")
    g.add_argument("--mu-scale", type=_positive_float, default=None,
                   help="Poisson optical depth per sinogram unit (default 4/image_size)")
    g.add_argument("--noise-level", type=_nonnegative_float, default=d["noise_level"])
    g.add_argument("--n-ellipses", type=_nonnegative_float, default=d["n_ellipses"],
                   help="mean number of random ellipses per phantom")
    g.add_argument("--fbp-filter", default=d["fbp_filter"])
    g.add_argument("--data-seed", type=_NONNEG, default=d["data_seed"])
    g.add_argument("--n-train", type=_POS, default=d["n_train"])
    g.add_argument("--n-val", type=_POS, default=d["n_val"])
    m = parser.add_argument_group("model")
    m.add_argument("--model", choices=("lpd", "lspd", "sklspd"), default="lpd")
    m.add_argument("--preset", choices=("digits", "clinical"), default="digits")
    m.add_argument("--iterations", type=_POS, help="unrolled iterations K")
    m.add_argument("--channels", type=_POS, help="hidden channels of every block")
    m.add_argument("--kernel-size", type=_POS)
    m.add_argument("--subsets", type=_POS, help="LSPD / Sk-LSPD angle subsets m")
    m.add_argument("--subset-order", choices=("cyclic", "random"))
    m.add_argument("--sketch-factor", type=_POS, help="Sk-LSPD grid coarsening")
    m.add_argument("--unsketched", type=_NONNEG, help="Sk-LSPD: last layers on the full grid")
    m.add_argument("--step-init", type=_positive_float, help="initial sigma_k, tau_k (normalised A)")
    m.add_argument("--init", choices=("fbp", "zero"))
    o = parser.add_argument_group("optimisation")
    o.add_argument("--epochs", type=_POS, default=10)
    o.add_argument("--batch-size", type=_POS, default=8)
    o.add_argument("--lr", type=_positive_float, default=5e-5, help="Adam learning rate (5e-5)")
    o.add_argument("--betas", type=_beta, nargs=2, default=(0.5, 0.99))
    o.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    o.add_argument("--warmup", type=_NONNEG, default=0, help="linear lr warm-up steps")
    o.add_argument("--clip", type=_finite_float, default=1.0, help="gradient-norm clip (<=0: none)")
    o.add_argument("--seed", type=_NONNEG, default=0, help="weights, sample order, random subsets")
    o.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    o.add_argument("--threads", type=_POS, default=None, help="torch CPU threads")
    o.add_argument("--out", default=None, help="checkpoint folder (default runs/<model>)")
    o.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    o.add_argument("--save-every", type=_NONNEG, default=0, help="also save last.pt every N steps")
    o.add_argument("--no-progress", action="store_true")


_MODEL_ARGS = {"iterations": "n_iterations", "channels": "hidden_channels",
               "kernel_size": "kernel_size", "subsets": "n_subsets",
               "subset_order": "subset_order", "sketch_factor": "sketch_factor",
               "unsketched": "n_unsketched", "step_init": "step_init", "init": "init"}


def train_from_args(args: argparse.Namespace) -> TrainResult:
    """Run ``python -m recon.train train`` with parsed ``args``; returns the :class:`TrainResult`."""
    from ..models import build_model

    from . import parallel

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = parallel.init_from_env(args.device)  # under torchrun: join the group
    out = Path(args.out or f"runs/{args.model}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; checkpoints need a folder")
    setup = default_setup(dataset=args.dataset, image_size=args.image_size,
                          n_angles=args.n_angles, n_detectors=args.n_detectors, noise=args.noise,
                          photons=args.photons, mu_scale=args.mu_scale,
                          noise_level=args.noise_level, n_ellipses=args.n_ellipses,
                          fbp_filter=args.fbp_filter, data_seed=args.data_seed, n_train=args.n_train, n_val=args.n_val)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         betas=tuple(args.betas), schedule=args.schedule,
                         warmup_steps=args.warmup,
                         clip_grad_norm=args.clip if args.clip > 0 else None, seed=args.seed,
                         device=args.device, save_every=args.save_every,
                         progress=not args.no_progress)
    if args.resume:  # the settings known now are checked before the data are simulated
        _precheck_resume(out / "last.pt", config, setup, args.model)
    operator, train_data = build_setup(setup, "train")
    _, val_data = build_setup(setup, "val", operator=operator)
    overrides = {key: getattr(args, arg) for arg, key in _MODEL_ARGS.items()
                 if getattr(args, arg) is not None}
    torch.manual_seed(args.seed)
    model = build_model(args.model, operator, args.preset,
                        fbp_filter=setup["fbp_filter"], **overrides)
    config = dataclasses.replace(
        config, x0_key="fbp" if model.get_config().get("init") == "fbp" else None)
    metadata = {"model_name": args.model, "model_config": model.get_config(), "setup": setup}
    return fit(model, train_data, val_data, config, out, resume=args.resume, metadata=metadata)


def _precheck_resume(last: Path, config: TrainConfig, setup: dict, model_name: str) -> None:
    """The resume rule on the settings known before any work (the full check follows in
    :func:`recon.training.fit`)."""
    from ..checkpoint import check_resume, load_checkpoint
    from .state import _RESUMABLE, _plain

    if not last.is_file():
        raise FileNotFoundError(f"cannot resume: {str(last)!r} does not exist (no earlier run "
                                f"in this folder); train without --resume")
    state = load_checkpoint(last)
    meta = state.get("metadata") or {}
    saved = {**_plain(dataclasses.asdict(TrainConfig())), **(state.get("train_config") or {})}
    now = _plain(dataclasses.asdict(config))
    for key in ("x0_key",):  # decided by the model, checked by fit
        saved.pop(key, None), now.pop(key, None)
    check_resume(last, {"train_config": saved, "metadata": {"setup": meta.get("setup"),
                                                            "model_name": meta.get("model_name")}},
                 {"train_config": now, "metadata": {"setup": setup, "model_name": model_name}},
                 ignore=[f"train_config.{key}" for key in _RESUMABLE])


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m recon.train evaluate``."""
    parser.add_argument("checkpoints", nargs="+", help="best.pt files written by `train`")
    parser.add_argument("--n-test", type=_POS, default=64, help="test samples (default 64)")
    parser.add_argument("--out", default="runs/table", help="folder of table.json, samples.png")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=_POS, default=16)
    parser.add_argument("--time-batch", type=_POS, default=1,
                        help="samples per timed pass (default 1)")
    parser.add_argument("--repeats", type=_POS, default=20, help="timed passes per method")
    parser.add_argument("--threads", type=_POS, default=None, help="torch CPU threads")
    parser.add_argument("--png-samples", type=_NONNEG, default=3)


def run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate the checkpoints named in ``args``; print the table; write JSON and PNG."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    setup, operator, methods = load_methods(args.checkpoints, device)
    _, data = build_setup(setup, split="test", n=args.n_test, operator=operator)
    rows, outputs = evaluate_methods(methods, data, batch_size=args.batch_size,
                                     time_batch=args.time_batch, repeats=args.repeats,
                                     device=device)
    reference = "LPD" if "LPD" in methods else None
    table = format_table(rows, reference)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"rows": rows, "device": str(device), "threads": torch.get_num_threads(),
              "time_batch": args.time_batch, "repeats": args.repeats, "setup": setup,
              "checkpoints": [str(p) for p in args.checkpoints],
              "torch": torch.__version__}
    with atomic_write(out / "table.json", "w") as handle:
        handle.write(json.dumps(report, indent=2))
    save_samples_png(out / "samples.png", data["image"], outputs, args.png_samples)
    print(table)
    print(f"wrote {out / 'table.json'} and {out / 'samples.png'}")
    return report


def main(argv: Sequence[str] | None = None) -> Any:
    """``python -m recon.train {train,evaluate} ...``; returns the TrainResult or the report."""
    parser = argparse.ArgumentParser(prog="python -m recon.train", description=plain_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_arguments(sub.add_parser("train", help="train LPD / LSPD / Sk-LSPD"))
    add_evaluate_arguments(sub.add_parser("evaluate", help="Table 3.1 analog of checkpoints"))
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        return run_evaluate(args)
    from . import parallel

    try:
        result = train_from_args(args)
    finally:
        is_main = parallel.is_main()
        parallel.shutdown()
    if not is_main:  # under torchrun only rank 0 reports
        return result
    for record in result.history:
        print(f"epoch {int(record['epoch']):3d}  step {int(record['step']):6d}  "
              f"train loss {record['train_loss']:.3e}  val PSNR {record['val_psnr']:.2f} dB  "
              f"({record['seconds']:.1f} s)")
    print(f"best val PSNR {result.best_val_psnr:.2f} dB (epoch {result.best_epoch}); "
          f"checkpoints {result.best_path}, {result.last_path}")
    return result


def console_main(argv: Sequence[str] | None = None, prog: str = "python -m recon.train",
                 entry=None) -> int:
    """Run ``entry`` (default :func:`main`) as a program: bad settings, missing or corrupt files
    print ``prog: error: ...`` (no traceback) and return exit status 2; a run that diverged
    (``FloatingPointError``: a NaN / inf loss or weight) prints the same and returns 1."""
    from ..checkpoint import CorruptCheckpointError

    try:
        (entry or main)(argv)
    except (ValueError, TypeError, FileNotFoundError, CorruptCheckpointError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0
