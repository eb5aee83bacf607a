"""GPU speed of the fused ray transform and of LPD / LSPD / Sk-LSPD with the fast options.

Four tables, every number measured in this run on one device:

1. ray transform, forward + adjoint ``A.T(A(x))`` in float32, ms per slice: the sparse matrix
   (cuSPARSE) against the fused matrix-free kernels (gather adjoint, and "fused/scatter" with
   the atomic-scatter adjoint) at 512x512 / 90 angles, batch 1, 8 and 32, and the fused
   kernels alone at 1024x1024 / 180 angles (no matrix is built); with the
   agreement of the two (max |fused - sparse| / max |sparse|) and the adjointness error;
2. inference of the 12-iteration clinical-preset networks at 512x512 / 90 angles, batch 8,
   ms per slice: fp32 with the sparse and the fused operator, bf16 autocast, bf16 +
   channels-last, CUDA graphs (fp32 and bf16) and torch.compile (bf16), each with its
   relative L2 distance to the fp32 output;
3. one training step (Adam, MSE) per network: fp32, bf16 and bf16 + CUDA graph, ms per slice;
4. the ratios LSPD/LPD and Sk-LSPD/LPD of every variant, against 0.5 and 0.35, and the
   targets: ray transform <= 0.1 ms per slice (512x512 / 90, batch 8), LPD <= 3 ms per slice.

Rows that fail are reported with their error and the run goes on; rows that would start
after --budget-s seconds are skipped (so the whole run fits a fixed slot). Without CUDA the
script says so and exits with status 0; --quick runs every code path on the CPU at 32x32
with 3-iteration networks instead (its numbers are not meaningful).

Usage::

    python benchmarks/gpu_fused.py --out runs/gpu        # on a CUDA machine
    python benchmarks/gpu_fused.py --quick               # CPU smoke run

Writes gpu_fused.json and gpu_fused.txt (the tables) under --out.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.models import LSPD, FastInference, FastTrainStep, LearnedPrimalDual, SketchedLSPD  # noqa: E402
from recon.operators import ParallelBeamGeometry, RayTransform, adjointness_test  # noqa: E402
from recon.operators._fused_backend import FusedProjector  # noqa: E402
from recon.scripts import apply_quick, help_parser  # noqa: E402

TARGETS = {"ratio LSPD/LPD": 0.5, "ratio Sk-LSPD/LPD": 0.35, "FP+BP ms/slice": 0.1,
           "LPD ms/slice": 3.0}
#: (name, precision, channels_last, cuda_graph, compile, operator method) of the inference rows
VARIANTS = [("fp32", "fp32", False, False, False, "fused"),
            ("fp32 sparse", "fp32", False, False, False, "sparse"),
            ("bf16", "bf16", False, False, False, "fused"),
            ("bf16 channels-last", "bf16", True, False, False, "fused"),
            ("fp32 graph", "fp32", False, True, False, "fused"),
            ("bf16 graph", "bf16", True, True, False, "fused"),
            ("bf16 compiled", "bf16", True, False, True, "fused")]
#: Seconds a torch.compile row is expected to need (it does not start with less budget left).
COMPILE_SECONDS = 90.0
TRAIN_VARIANTS = [("fp32", "fp32", False), ("bf16", "bf16", False), ("bf16 graph", "bf16", True)]


class Clock:
    """Wall-clock budget: ``ok()`` is False once ``budget`` seconds have passed."""

    def __init__(self, budget: float):
        self.start, self.budget = time.perf_counter(), budget

    def ok(self, need: float = 0.0) -> bool:
        """Whether a new row that takes about ``need`` seconds may still start."""
        return time.perf_counter() - self.start + need < self.budget


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA) so wall-clock times are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device, repeats: int, warmup: int) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def guarded(rows: list, clock: Clock, base: dict, fn, need: float = 0.0) -> None:
    """Append ``{**base, **fn()}``; a failure or an exhausted budget is a row saying so."""
    if not clock.ok(need):
        rows.append({**base, "skipped": "time budget"})
        return
    try:
        rows.append({**base, **fn()})
    except Exception as exc:  # noqa: BLE001 - report and go on with the next row
        rows.append({**base, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        print(f"FAILED {base}: {rows[-1]['error']}", file=sys.stderr)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------ 1. ray transform
def operator_rows(args, device, clock) -> list:
    """FP+BP ms per slice, sparse vs fused, and their agreement."""
    rows = []
    for size, n_angles, methods in args.operator_configs:
        geometry = ParallelBeamGeometry((size, size), n_angles=n_angles)
        ops = {m: make_operator(geometry, m) for m in methods}
        for batch in args.operator_batches:
            x = torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0))
            x = x.to(device)
            for method, op in ops.items():
                base = {"size": size, "n_angles": n_angles, "batch": batch, "operator": method}
                guarded(rows, clock, base, lambda: time_operator(op, x, device, args.repeats))
        for name in [m for m in ops if m.startswith("fused") and "sparse" in ops]:
            guarded(rows, clock, {"size": size, "n_angles": n_angles, "check": f"{name} vs sparse"},
                    lambda: agreement(ops["sparse"], ops[name], device))
    return rows


def time_operator(op, x, device, repeats: int) -> dict:
    """ms per slice of ``A.T(A(x))``, and of ``A x`` and ``A.T y`` alone."""
    y = op(x)
    batch = x.shape[0]
    per_slice = {key: 1e3 * median_seconds(fn, device, repeats, 2) / batch
                 for key, fn in (("ms_per_slice", lambda: op.T(op(x))), ("fp_ms", lambda: op(x)),
                                 ("bp_ms", lambda: op.T(y)))}
    return per_slice


def make_operator(geometry, name: str) -> RayTransform:
    """``"sparse"``, ``"fused"`` or ``"fused/scatter"`` (the atomic-scatter adjoint)."""
    method, _, adjoint = name.partition("/")
    op = RayTransform(geometry, method=method, check_finite=False)
    if adjoint:
        op._impl.adjoint_kernel = adjoint
    return op


def agreement(sparse, fused, device) -> dict:
    """Max relative differences of fused vs sparse (float32) and fused's adjointness errors."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand((2, 1) + sparse.domain_shape, generator=gen).to(device)
    y = torch.rand((2, 1) + sparse.range_shape, generator=gen).to(device)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    return {"forward_rel_err": rel(fused(x), sparse(x)), "adjoint_rel_err": rel(fused.T(y), sparse.T(y)),
            "adjointness_fp32": adjointness_test(fused, dtype=torch.float32, device=device),
            "adjointness_fp64": adjointness_test(fused, dtype=torch.float64, device=device)}


# ------------------------------------------------------------------ 2./3. networks
def build_nets(args, method, device) -> dict:
    """LPD, LSPD and Sk-LSPD of the preset on the ``method`` operator (same seeds)."""
    geometry = ParallelBeamGeometry((args.size, args.size), n_angles=args.n_angles)
    op = RayTransform(geometry, method=method, check_finite=False)
    norm = op.norm(device=device)  # the power method on the device (fast for fused operators)
    nets = {}
    for name, cls, extra in (("LPD", LearnedPrimalDual, {}), ("LSPD", LSPD, {"n_subsets": 4}),
                             ("Sk-LSPD", SketchedLSPD, {"n_subsets": 4, **args.sketch_overrides})):
        torch.manual_seed(0)
        nets[name] = cls.from_preset(op, args.preset, operator_norm=norm,
                                     **args.overrides, **extra).to(device).eval()
    return nets, op


def safe_build(args, method, device, rows, label):
    """:func:`build_nets`, or ``None`` with an error row when it fails."""
    try:
        return build_nets(args, method, device)
    except Exception as exc:  # noqa: BLE001 - report and go on
        rows.append({"table": label, "method": "all", "variant": f"{method} operator",
                     "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        print(f"FAILED building the {method} networks: {rows[-1]['error']}", file=sys.stderr)
        return None


def inference_rows(args, device, clock, compiled_rows: bool = False) -> list:
    """ms per slice of every inference variant of every network, with the error vs fp32.

    ``compiled_rows``: only the torch.compile variants (run last: they take the longest)."""
    rows, nets_by_method, reference = [], {}, args.reference
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 1, args.size, args.size, generator=gen).to(device)
    for label, precision, channels_last, graph, compiled, method in VARIANTS:
        if method not in args.methods or (graph and device.type != "cuda") \
                or compiled != compiled_rows or (compiled and not args.compile):
            continue
        if method not in nets_by_method:
            nets_by_method[method] = safe_build(args, method, device, rows, label)
        if nets_by_method[method] is None:
            continue
        nets, op = nets_by_method[method]
        y = op(x)
        for name, net in nets.items():
            base = {"table": "inference", "method": name, "variant": label}
            guarded(rows, clock, base, lambda: time_inference(
                args, net, y, device, reference, name, precision=precision,
                channels_last=channels_last, cuda_graph=graph, compile=compiled),
                need=COMPILE_SECONDS if compiled else 0.0)
    return rows


def time_inference(args, net, y, device, reference, name, **options) -> dict:
    """One inference row: ms per slice and the relative L2 distance to the fp32 output."""
    fast = FastInference(copy.deepcopy(net), **options)
    seconds = median_seconds(lambda: fast(y), device, args.repeats, args.warmup)
    out = fast(y).float()
    if name not in reference:  # the first variant of each network is fp32 eager
        reference[name] = out
    err = float((out - reference[name]).norm() / reference[name].norm())
    row = {"ms_per_slice": 1e3 * seconds / y.shape[0], "rel_err_vs_fp32": err}
    if options.get("compile"):  # False when torch.compile failed and the row ran eagerly
        row["compiled"] = fast.options.fn is not fast.options.model
    return row


def train_rows(args, device, clock) -> list:
    """ms per slice of one optimisation step (Adam, MSE) of every network and variant."""
    rows = []
    built = safe_build(args, "fused", device, rows, "training")
    if built is None:
        return rows
    nets, op = built
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(args.batch, 1, args.size, args.size, generator=gen).to(device)
    y = op(x)
    for label, precision, graph in TRAIN_VARIANTS:
        if graph and device.type != "cuda":
            continue
        for name, net in nets.items():
            def run(net=net, precision=precision, graph=graph):
                model = copy.deepcopy(net).train()
                opt = torch.optim.Adam(model.parameters(), lr=1e-4,
                                       capturable=device.type == "cuda")
                step = FastTrainStep(model, opt, precision=precision, cuda_graph=graph,
                                     channels_last=precision == "bf16")
                seconds = median_seconds(lambda: step(y, x), device, args.repeats, args.warmup)
                return {"ms_per_slice": 1e3 * seconds / args.batch,
                        "loss": float(step(y, x))}
            guarded(rows, clock, {"table": "training", "method": name, "variant": label}, run)
    return rows


# ------------------------------------------------------------------ 4. summary
def summary(rows: list) -> list:
    """Ratios to LPD per (table, variant) and the target checks."""
    out = []
    timed = {(r["table"], r["variant"], r["method"]): r["ms_per_slice"]
             for r in rows if "table" in r and "ms_per_slice" in r}
    for (table, variant, method), ms in sorted(timed.items()):
        lpd = timed.get((table, variant, "LPD"))
        key = f"ratio {method}/LPD"
        if method != "LPD" and lpd and key in TARGETS:
            out.append({"check": key, "table": table, "variant": variant,
                        "value": ms / lpd, "target": TARGETS[key]})
        if method == "LPD" and table == "inference":
            out.append({"check": "LPD ms/slice", "variant": variant, "value": ms,
                        "target": TARGETS["LPD ms/slice"]})
    for r in rows:
        if r.get("operator") == "fused" and r.get("batch") == 8 and "ms_per_slice" in r \
                and (r["size"], r["n_angles"]) == (512, 90):
            out.append({"check": "FP+BP ms/slice", "variant": "fused 512/90 batch 8",
                        "value": r["ms_per_slice"], "target": TARGETS["FP+BP ms/slice"]})
    for c in out:
        c["met"] = c["value"] <= c["target"]
    return out


def _cell(r: dict) -> str:
    if "error" in r:
        return "FAILED " + r["error"][:90]
    if "skipped" in r:
        return "skipped (" + r["skipped"] + ")"
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in r.items() if k in ("ms_per_slice", "fp_ms", "bp_ms",
                                                     "rel_err_vs_fp32", "loss",
                                                     "forward_rel_err", "adjoint_rel_err",
                                                     "adjointness_fp32", "adjointness_fp64",
                                                     "compiled"))


def format_tables(report: dict) -> str:
    """The four tables as plain text."""
    lines = [f"device: {report['device']}; torch {report['torch']}; {report['time']}; "
             f"fused kernels: {report['fused_kernel']}", "",
             "1. ray transform A.T(A(x)), float32"]
    for r in report["operator"]:
        what = r.get("operator", r.get("check"))
        lines.append(f"  {r['size']:>5}^2 {r['n_angles']:>4} ang  B {r.get('batch', ''):>3}  "
                     f"{what:<24} {_cell(r)}")
    for title, key in (("2. inference, ms per slice", "inference"),
                       ("3. training step, ms per slice", "training")):
        lines += ["", f"{title} ({report['config']})"]
        for r in report[key]:
            lines.append(f"  {r['method']:<8} {r['variant']:<20} {_cell(r)}")
    lines += ["", "4. ratios and targets"]
    for c in report["summary"]:
        lines.append(f"  {c['check']:<18} {c.get('table', ''):<9} {c['variant']:<22} "
                     f"{c['value']:8.4g}  target <= {c['target']:<5} "
                     f"{'met' if c['met'] else 'MISSED'}")
    return "\n".join(lines)


def parse_args(argv=None):
    """Command line (see the module docstring); ``--quick`` sets the CPU smoke configuration."""
    parser = help_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run of every code path")
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--n-angles", type=int, default=90)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--preset", default="clinical", choices=("digits", "clinical"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile rows (they take the longest to set up)")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="start no new row after this many seconds")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.notes = []
    args.operator_configs = [(512, 90, ("sparse", "fused", "fused/scatter")),
                             (1024, 180, ("fused", "fused/scatter"))]
    args.operator_batches = [1, 8, 32]
    args.overrides, args.sketch_overrides = {}, {}
    if args.quick:
        args.notes = apply_quick(parser, args, argv, {
            "device": "cpu", "size": 32, "n_angles": 12, "batch": 2, "repeats": 2, "warmup": 1},
            out=os.path.join("runs", "quick", "gpu_fused"))
        args.compile = False
        args.notes.append("--quick: no torch.compile rows")
        args.operator_configs = [(32, 12, ("sparse", "fused", "fused/scatter")),
                                 (64, 16, ("fused",))]
        args.operator_batches = [1, 4]
        args.overrides = {"n_iterations": 3, "hidden_channels": 8}
        args.sketch_overrides = {"n_unsketched": 1}
    args.methods = ("fused", "sparse")
    return args


def main(argv=None) -> int:
    """Run the four tables; write ``gpu_fused.json`` and ``gpu_fused.txt`` under ``--out``."""
    args = parse_args(argv)
    for line in args.notes:
        print(line)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: torch.cuda.is_available() is False, so there is nothing to "
              "measure (run with --quick for a CPU smoke run of the same code)")
        return 0
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    clock = Clock(args.budget_s)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or platform.machine(),
              "torch": torch.__version__, "python": platform.python_version(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": args.quick,
              "config": f"{args.size}^2, {args.n_angles} angles, batch {args.batch}, "
                        f"preset {args.preset}", "targets": TARGETS, "_start": clock.start,
              "fused_kernel": "triton" if FusedProjector(ParallelBeamGeometry((4, 4), 1))
              .uses_triton(torch.zeros(1, device=device)) else "torch reference"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.reference = {}  # fp32 outputs of the networks, for the error column
    for key, fn in (("operator", operator_rows), ("inference", inference_rows),
                    ("training", train_rows),
                    ("inference", lambda *a: inference_rows(*a, compiled_rows=True))):
        report[key] = report.get(key, []) + fn(args, device, clock)
        write(report, out)  # what is done survives a kill from outside
    text = write(report, out)
    print(text)
    print(f"wrote {out / 'gpu_fused.json'} and {out / 'gpu_fused.txt'} "
          f"({report['seconds']:.0f} s)")
    return 0


def write(report: dict, out: Path) -> str:
    """Fill in the summary, write JSON and tables under ``out``; return the tables."""
    for key in ("operator", "inference", "training"):
        report.setdefault(key, [])
    report["summary"] = summary(report["inference"] + report["training"] + report["operator"])
    report["seconds"] = time.perf_counter() - report["_start"]
    text = format_tables(report)
    (out / "gpu_fused.json").write_text(json.dumps(
        {k: v for k, v in report.items() if not k.startswith("_")}, indent=2))
    (out / "gpu_fused.txt").write_text(text + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
