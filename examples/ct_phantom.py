"""Draw a phantom, its (optionally low-dose) sinogram and its FBP reconstruction as a PNG.

    python examples/ct_phantom.py --out ct_phantom.png

Options: ``--phantom {lesion,ellipses,shepp-logan}``, ``--size 256``, ``--angles 90``,
``--I0 7e4`` (Poisson low-dose noise; 0 for clean data), ``--filter hann``,
``--backend {torch,astra,odl}``. The figure shows the ground truth (with the lesion
mask outlined), the sinogram (angles down, detector across) and the FBP with its PSNR
and SSIM.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.data import PoissonNoise, ellipse_phantom, lesion_phantom, shepp_logan  # noqa: E402
from recon.metrics import psnr, ssim  # noqa: E402
from recon.operators import ParallelBeamGeometry, RayTransform, fbp  # noqa: E402
from recon.scripts import help_parser  # noqa: E402
from recon.training.argtypes import float_above  # noqa: E402


def main(argv=None) -> int:
    """Simulate, reconstruct and draw; returns the exit status."""
    parser = help_parser(__doc__)
    parser.add_argument("--out", default="ct_phantom.png", help="output PNG path")
    parser.add_argument("--phantom", choices=["lesion", "ellipses", "shepp-logan"], default="lesion")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--angles", type=int, default=90)
    parser.add_argument("--I0", type=float_above(0.0, strict=False), default=7e4, help="incident photons per bin; 0 = no noise")
    parser.add_argument("--filter", default="hann")
    parser.add_argument("--backend", default="torch", choices=["torch", "astra", "odl"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = (args.size, args.size)
    rng = np.random.default_rng(args.seed)
    mask = None
    if args.phantom == "lesion":
        image, mask = lesion_phantom(shape, rng)
    elif args.phantom == "ellipses":
        image = ellipse_phantom(shape, rng)
    else:
        image = shepp_logan(shape)
    x = image[None, None].float()
    A = RayTransform(ParallelBeamGeometry(shape, n_angles=args.angles), backend=args.backend)
    sino = A(x)
    title = "clean sinogram"
    if args.I0 > 0:
        # unit pixels: a value of 1 attenuates like water at ~0.02/mm over a 200 mm field of view
        noise = PoissonNoise(args.I0, mu_scale=4.0 / args.size)
        sino = noise(sino, torch.Generator().manual_seed(args.seed))
        title = f"low-dose sinogram, I0={args.I0:g}"
    rec = fbp(sino, A, filter=args.filter)

    fig, ax = plt.subplots(1, 3, figsize=(15, 5))
    ax[0].imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
    if mask is not None:
        ax[0].contour(mask.numpy(), levels=[0.5], colors="r", linewidths=0.8)
    ax[0].set_title(f"{args.phantom} phantom {args.size}x{args.size}")
    ax[1].imshow(sino[0, 0].numpy(), cmap="gray", aspect="auto")
    ax[1].set_title(f"{title}, {args.angles} angles")
    ax[1].set_xlabel("detector bin")
    ax[1].set_ylabel("angle index")
    ax[2].imshow(rec[0, 0].numpy(), cmap="gray", vmin=0, vmax=1)
    ax[2].set_title(f"FBP ({args.filter}): PSNR {float(psnr(rec, x, 1.0)[0]):.2f} dB, "
                    f"SSIM {float(ssim(rec, x, 1.0)[0]):.3f}")
    for a in (ax[0], ax[2]):
        a.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
