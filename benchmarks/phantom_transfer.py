"""Do phantom-trained networks transfer to real images?  Phantom-test gain vs real-test gain.

Trains one LPD per training phantom family (``ellipses``: ~10 random ellipses, the Table 3.1
analog's data; ``anatomy``: :func:`recon.data.anatomy_phantom`) with the same recipe and
budget, then reports, for every test set, the mean PSNR of FBP and LPD and the gain
``PSNR(LPD) - PSNR(FBP)`` in dB, side by side:

- ``ellipses`` / ``anatomy``: held-out phantoms of each family (test seeds);
- ``CT_small``: the real CT slice that pydicom ships (``recon.data.example_ct_path``, read with
  ``recon.data.DicomSliceDataset``, scaled to peak 1 like the phantoms) in its 8 orientations
  (rotations by 90° and flips: the networks are not equivariant, so these are 8 different
  inputs of one anatomy);
- ``natural``: scikit-image's bundled images (another kind of image), resized to the grid.

All test data are simulated with the same geometry and noise (none by default); PSNR uses each
reference image's range.  ``--checkpoint family=path`` evaluates an existing LPD ``best.pt``
(e.g. the one of ``examples/ct_unrolling.py``) instead of training that family.

    python benchmarks/phantom_transfer.py --out runs/phantom_transfer
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.checkpoint import load_checkpoint  # noqa: E402
from recon.data import DicomSliceDataset, example_ct_path, load_bundled_image  # noqa: E402
from recon.metrics import psnr  # noqa: E402
from recon.models import build_model  # noqa: E402
from recon.operators import fbp  # noqa: E402
from recon.train import TrainConfig, build_setup, default_setup, fit  # noqa: E402
from recon.scripts import help_parser  # noqa: E402

NATURAL = ("camera", "coins", "moon", "page", "brick", "grass", "gravel", "clock")


def real_ct_images(operator) -> torch.Tensor:
    """The pydicom CT slice on the operator's grid, peak 1, in its 8 orientations."""
    image = DicomSliceDataset(example_ct_path(), operator)[0]["image"].float()
    image = image / image.max()
    views = [torch.rot90(image, k, dims=(-2, -1)) for k in range(4)]
    return torch.stack(views + [v.flip(-1) for v in views])


def natural_images(size: int, names=NATURAL) -> torch.Tensor:
    """scikit-image bundled images, centre-cropped square and resized to ``size²``, in [0, 1]."""
    out = []
    for name in names:
        img = torch.as_tensor(load_bundled_image(name), dtype=torch.float32)
        side = min(img.shape)
        top, left = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
        img = img[top:top + side, left:left + side][None, None]
        out.append(F.interpolate(img, size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False)[0].clamp(0, 1))
    return torch.stack(out)


def test_sets(args, operator) -> dict[str, torch.Tensor]:
    """``{name: (N, 1, H, W) images}`` of every test set."""
    sets = {}
    for family in args.families:
        _, data = build_setup(_setup(args, family), "test", operator=operator)
        sets[family] = data["image"].float()
    sets["CT_small"] = real_ct_images(operator)
    sets["natural"] = natural_images(args.image_size)
    return sets


def _setup(args, family):
    return default_setup(dataset=family, image_size=args.image_size, n_angles=args.n_angles,
                         n_ellipses=args.n_ellipses, n_train=args.n_train, n_val=args.n_val,
                         n_test=args.n_test, fbp_filter=args.fbp_filter)


def train_lpd(args, family, out: Path):
    """LPD trained on ``family`` phantoms (or loaded from ``--checkpoint family=path``)."""
    setup = _setup(args, family)
    operator, train = build_setup(setup, "train")
    _, val = build_setup(setup, "val", operator=operator)
    torch.manual_seed(args.seed)
    model = build_model("lpd", operator, "digits", fbp_filter=args.fbp_filter, zero_last=True)
    if family in args.checkpoint:
        model.load_state_dict(load_checkpoint(args.checkpoint[family])["model"])
        return operator, model.eval(), 0.0
    start = time.perf_counter()
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         warmup_steps=args.warmup, seed=args.seed, progress=True)
    fit(model, train, val, config, out / family, metadata={
        "model_name": "lpd", "model_config": model.get_config(), "setup": setup})
    model.load_state_dict(load_checkpoint(out / family / "best.pt")["model"])
    return operator, model.eval(), time.perf_counter() - start


@torch.inference_mode()
def evaluate(model, operator, images: torch.Tensor, fbp_filter: str) -> dict[str, float]:
    """Mean PSNR of FBP and of ``model`` on noise-free data of ``images``; their gain."""
    sino = operator(images)
    x_fbp = fbp(sino, operator, filter=fbp_filter)
    x_net = model(sino, x_fbp)
    p_fbp, p_net = float(psnr(x_fbp, images).mean()), float(psnr(x_net, images).mean())
    return {"fbp": p_fbp, "lpd": p_net, "gain": p_net - p_fbp, "n": int(images.shape[0])}


def main(argv=None) -> dict:
    """Train per family, evaluate on every test set, print the side-by-side gain table."""
    p = help_parser(__doc__)
    p.add_argument("--families", nargs="+", default=["ellipses", "anatomy"],
                   choices=("ellipses", "anatomy"))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n-angles", type=int, default=15)
    p.add_argument("--n-ellipses", type=float, default=10)
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-val", type=int, default=32)
    p.add_argument("--n-test", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=64)
    p.add_argument("--fbp-filter", default="hann")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint", nargs="*", default=[], metavar="FAMILY=PATH")
    p.add_argument("--out", default="runs/phantom_transfer")
    args = p.parse_args(argv)
    args.checkpoint = dict(item.split("=", 1) for item in args.checkpoint)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results, seconds = {}, {}
    for family in args.families:
        operator, model, seconds[family] = train_lpd(args, family, out)
        sets = test_sets(args, operator)
        results[family] = {name: evaluate(model, operator, images, args.fbp_filter)
                           for name, images in sets.items()}
    names = list(next(iter(results.values())))
    trained = ", ".join(f"{f}: {args.checkpoint[f]}" if f in args.checkpoint
                        else f"{f}: {args.epochs} epochs x {args.n_train}" for f in args.families)
    print(f"LPD gain over FBP ({args.fbp_filter}) in dB, {args.image_size}², {args.n_angles} "
          f"angles; trained ({trained}); cells: FBP -> LPD gain")
    print(f"{'trained on':>10} | " + " | ".join(f"{n:>22}" for n in names))
    for family, row in results.items():
        print(f"{family:>10} | " + " | ".join(
            f"{r['fbp']:6.2f} -> {r['lpd']:6.2f} {r['gain']:+5.2f}" for r in row.values()))
    report = {"args": vars(args), "results": results, "train_seconds": seconds}
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
