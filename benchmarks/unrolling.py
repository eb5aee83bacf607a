"""Inference speed of the unrolled networks: LPD vs LSPD vs Sk-LSPD (and FBP), side by side.

Timings of untrained networks equal those of trained ones (same operations), so this needs no
training.  All methods of one configuration are timed interleaved in the same process on the
same device (``recon.training.time_methods``: median of ``--repeats`` passes, CUDA synchronised)
and reported as milliseconds per sample and as ratios to LPD (the Table 3.1 speed columns).

Examples::

    python benchmarks/unrolling.py                       # CPU, 64², digits preset
    python benchmarks/unrolling.py --device cuda --size 512 --n-angles 90 \\
        --preset clinical --batch 8 --precision fp32 bf16 --method sparse matrix_free

Each ratio is compared with a level to aim at: LSPD/LPD <= 0.5 and Sk-LSPD/LPD <= 0.35; with
``--target-ms`` also the LPD time per sample (e.g. 5 ms for the 12-iteration LPD on a 512²,
90-angle slice at batch 8 on a GPU).
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.training.evaluation import time_methods  # noqa: E402
from recon.models import LSPD, LearnedPrimalDual, SketchedLSPD  # noqa: E402
from recon.operators import ParallelBeamGeometry, RayTransform, fbp  # noqa: E402
from recon.scripts import help_parser  # noqa: E402

RATIO_TARGETS = {"LSPD": 0.5, "Sk-LSPD": 0.35}
#: profiler op names -> the part of the network they belong to (the rest is "other")
PROFILE_GROUPS = {"aten::mkldnn_convolution": "convolution", "aten::_prelu_kernel": "PReLU",
                  "aten::convolution_overrideable": "convolution",
                  "aten::cudnn_convolution": "convolution", "_Apply": "ray transform",
                  "aten::cat": "concatenation", "aten::upsample_bilinear2d": "resampling"}


def build_methods(size: int, n_angles: int, preset: str, subsets: int, method: str,
                  device: torch.device, channels_last: bool, sketch_hidden=()):
    """FBP, LPD, LSPD and Sk-LSPD on one geometry (eval mode, on ``device``).

    Every width in ``sketch_hidden`` adds a Sk-LSPD whose sketched layers have that hidden
    width (``Sk-LSPD/h<width>``)."""
    geometry = ParallelBeamGeometry((size, size), n_angles=n_angles)
    op = RayTransform(geometry, backend="torch", method=method, check_finite=False)
    torch.manual_seed(0)
    nets = {"LPD": LearnedPrimalDual.from_preset(op, preset),
            "LSPD": LSPD.from_preset(op, preset, n_subsets=subsets),
            "Sk-LSPD": SketchedLSPD.from_preset(op, preset, n_subsets=subsets)}
    for width in sketch_hidden:
        nets[f"Sk-LSPD/h{width}"] = SketchedLSPD.from_preset(op, preset, n_subsets=subsets,
                                                             sketch_hidden_channels=width)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for net in nets.values():
        net.to(device=device, memory_format=memory_format).eval()
    return op, {"FBP": lambda y: fbp(y, op, filter="hann"), **nets}


def run_config(args, size, n_angles, batch, precision, method, channels_last, device):
    """Time every method on one configuration; return result rows."""
    op, methods = build_methods(size, n_angles, args.preset, args.subsets, method, device,
                                channels_last, args.sketch_hidden)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 1, size, size, generator=gen)
    y = op(x).to(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        times = time_methods(methods, y, repeats=args.repeats, warmup=args.warmup)
    lpd = times["LPD"]
    shares = profile_methods(methods, y, autocast) if args.profile else {}
    rows = []
    for name, seconds in times.items():
        rows.append({"size": size, "n_angles": n_angles, "batch": batch, "precision": precision,
                     "operator": method, "channels_last": channels_last, "method": name,
                     "ms_per_sample": 1e3 * seconds, "ratio_to_lpd": seconds / lpd,
                     **({"profile": shares[name]} if name in shares else {})})
    return rows


def profile_methods(methods, y, autocast) -> dict:
    """``torch.profiler`` of one pass per network: {method: {part: share of the self time}}.

    Convolutions and PReLUs are split by where they run: on an image grid ("primal CNN") or on
    sinogram rows ("dual CNN"); ``_Apply`` is the ray transform (forward and adjoint)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if y.is_cuda else [])
    n_det = y.shape[-1]
    shares = {}
    for name, fn in methods.items():
        if name == "FBP":
            continue
        with torch.inference_mode(), autocast, profile(activities=activities,
                                                       record_shapes=True) as prof:
            fn(y)
        parts: dict[str, float] = {}
        for event in prof.key_averages(group_by_input_shape=True):
            part = PROFILE_GROUPS.get(event.key, "other")
            if part in ("convolution", "PReLU"):
                shape = event.input_shapes[0] if event.input_shapes else []
                space = "dual" if len(shape) == 4 and shape[-1] == n_det else "primal"
                part = f"{space} CNN {part}"
            parts[part] = parts.get(part, 0.0) + event.self_cpu_time_total
        total = sum(parts.values()) or 1.0
        shares[name] = {k: v / total for k, v in sorted(parts.items())}
    return shares


def format_rows(rows) -> str:
    """Plain-text table of the result rows."""
    head = (f"{'size':>5} {'ang':>4} {'B':>3} {'prec':>5} {'operator':>11} {'method':>12} "
            f"{'ms/sample':>10} {'/LPD':>6}  target")
    lines = [head, "-" * len(head)]
    for r in rows:
        target = r.get("target", "")
        lines.append(f"{r['size']:>5} {r['n_angles']:>4} {r['batch']:>3} {r['precision']:>5} "
                     f"{r['operator']:>11} {r['method']:>12} {r['ms_per_sample']:>10.3f} "
                     f"{r['ratio_to_lpd']:>6.3f}  {target}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Run every configuration, print the table, write ``<out>/<tag>.json``."""
    parser = help_parser(__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, nargs="+", default=[64])
    parser.add_argument("--n-angles", type=int, nargs="+", default=[60])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--preset", choices=("digits", "clinical"), default="digits")
    parser.add_argument("--subsets", type=int, default=4)
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32"])
    parser.add_argument("--method", nargs="+", choices=("sparse", "matrix_free", "fused"),
                        default=["sparse"], help="torch-backend projector implementation")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--sketch-hidden", type=int, nargs="*", default=[],
                        help="also time Sk-LSPD with this hidden width in the sketched layers")
    parser.add_argument("--profile", action="store_true",
                        help="torch.profiler share of each part (convolution, PReLU, ray "
                             "transform, ...) per network")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--target-ms", type=float, default=None,
                        help="also check LPD ms/sample against this target")
    parser.add_argument("--out", default=None, help="folder for the JSON result")
    parser.add_argument("--tag", default="unrolling")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda given but CUDA is not available")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows, errors = [], []
    for size in args.size:
        for n_angles in args.n_angles:
            for method in args.method:
                for precision in args.precision:
                    for batch in args.batch:
                        try:
                            rows += run_config(args, size, n_angles, batch, precision, method,
                                               args.channels_last, device)
                        except Exception as exc:  # keep going: report what failed and why
                            errors.append({"size": size, "n_angles": n_angles, "batch": batch,
                                           "precision": precision, "operator": method,
                                           "error": f"{type(exc).__name__}: {exc}"})
                            print(f"FAILED {errors[-1]}", file=sys.stderr)
    for r in rows:
        family = r["method"].split("/")[0]
        if family in RATIO_TARGETS:
            limit = RATIO_TARGETS[family]
            r["target"] = f"ratio <= {limit}: {'met' if r['ratio_to_lpd'] <= limit else 'MISSED'}"
        if r["method"] == "LPD" and args.target_ms is not None:
            r["target"] = (f"< {args.target_ms} ms: "
                           f"{'met' if r['ms_per_sample'] < args.target_ms else 'MISSED'}")
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or platform.machine())
    print(f"device: {device_name}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"preset {args.preset}; subsets {args.subsets}")
    print(format_rows(rows))
    for r in rows:
        if "profile" in r:
            print(f"profile {r['size']}² B{r['batch']} {r['method']:>12}: " + ", ".join(
                f"{k} {100 * v:.0f}%" for k, v in sorted(r["profile"].items(),
                                                       key=lambda kv: -kv[1])))
    report = {"device": device_name, "torch": torch.__version__, "python": platform.python_version(),
              "threads": torch.get_num_threads(), "args": vars(args), "rows": rows,
              "errors": errors, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{args.tag}.json"
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
