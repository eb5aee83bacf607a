"""Forward + adjoint throughput of the ray transform: torch backend vs ODL/ASTRA on the CPU.

For each configuration (128x128 image / 60 angles and 512x512 / 90 angles, parallel
beam, float32) it times one ``A.T(A(x))`` on a batch and reports slices per second:

* ``odl-astra_cpu``: ``odl.applications.tomo.RayTransform(impl="astra_cpu")`` forward
  and adjoint applied slice by slice — the baseline, measured in the same run;
* ``astra``: this package's ``backend="astra"`` (ASTRA directly, slice by slice);
* ``torch``: ``backend="torch"`` (cached sparse matrix) at batch 1 and 32;
* on CUDA, when available: ``torch`` sparse (cuSPARSE), ``matrix_free`` and ``fused`` (the
  matrix-free Triton kernels) at batch 1, 8, 32.

The speed-up column is throughput / baseline throughput. The one-off set-up (building or
loading the system matrix) is reported separately. Results go to a table on stdout and to
JSON (``benchmarks/results/operators.json`` by default).

Usage::

    python benchmarks/operators.py            # full run (a few minutes on 2 cores)
    python benchmarks/operators.py --quick    # smoke run: 64x64/30 and 128x128/60, fewer repeats
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.operators import ParallelBeamGeometry, RayTransform, available_backends  # noqa: E402
from recon.scripts import SMOKE_RUN, apply_quick, help_parser  # noqa: E402

FULL = [(128, 60), (512, 90)]
QUICK = [(64, 30), (128, 60)]


def timeit(fn, *, min_time: float, max_repeats: int, sync=None) -> float:
    """Median seconds per call after one warm-up call."""
    fn()
    if sync:
        sync()
    times, total = [], 0.0
    while len(times) < max_repeats and (total < min_time or len(times) < 1):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    return statistics.median(times)


def odl_baseline(geom, x, min_time, max_repeats):
    """Seconds of one ODL ``astra_cpu`` forward + adjoint of one slice."""
    from recon.operators._odl_backend import odl_operator, to_odl

    op, _ = odl_operator(geom, impl="astra_cpu")
    el = op.domain.element(to_odl(x[0, 0].numpy()))

    def run():
        op.adjoint(op(el))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timeit(run, min_time=min_time, max_repeats=max_repeats)


def _table(rows) -> list:
    """The printed table: one line per (geometry, implementation, device, batch)."""
    header = f"{'image':>7} {'angles':>6} {'impl':<18} {'dev':<4} {'batch':>5} {'ms/slice':>9} " \
             f"{'slices/s':>9} {'x ODL':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        sp = f"{r['speedup_vs_odl']:.1f}" if r["speedup_vs_odl"] else "n/a"
        lines.append(f"{r['image']:>5}^2 {r['n_angles']:>6} {r['impl']:<18} {r['device']:<4} {r['batch']:>5} "
                     f"{r['ms_per_slice']:>9.3f} {r['slices_per_s']:>9.1f} {sp:>7}")
    setups = {(r["image"], r["n_angles"]): r["setup_s"] for r in rows if r["setup_s"] is not None}
    lines.append("torch-sparse set-up (matrix build or disk-cache load, once per geometry): "
                 + ", ".join(f"{s}^2/{a}: {t:.2f} s" for (s, a), t in setups.items()))
    return lines


def main(argv=None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    parser = help_parser(__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small sizes and few repeats (about 20 s), written to "
                             "runs/quick/ (numbers not meaningful)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "operators.json"))
    parser.add_argument("--batches", default="1,32", help="CPU batch sizes (comma separated)")
    args = parser.parse_args(argv)
    if args.quick:
        for line in apply_quick(parser, args, argv, {}, out=str(Path("runs", "quick", "operators.json"))):
            print(line)
    configs = QUICK if args.quick else FULL
    batches = [int(b) for b in args.batches.split(",")]
    backends = available_backends()
    rows = []

    def add(size, n_angles, impl, device, batch, seconds, baseline, setup=None):
        rows.append(dict(image=size, n_angles=n_angles, impl=impl, device=device, batch=batch,
                         ms_per_batch=1e3 * seconds, ms_per_slice=1e3 * seconds / batch,
                         slices_per_s=batch / seconds,
                         speedup_vs_odl=(batch / seconds) / baseline if baseline else None,
                         setup_s=setup))

    for size, n_angles in configs:
        big = size >= 512
        min_time, reps = (0.2, 2) if big else (0.5, 10)
        if args.quick:
            min_time, reps = 0.1, 3
        geom = ParallelBeamGeometry((size, size), n_angles)
        gen = torch.Generator().manual_seed(0)
        x_all = torch.rand(max(batches + [32]), 1, size, size, generator=gen)
        baseline = None
        if "odl" in backends:
            t = odl_baseline(geom, x_all, min_time, reps)
            baseline = 1.0 / t
            add(size, n_angles, "odl-astra_cpu", "cpu", 1, t, baseline)
        if "astra" in backends:
            S = RayTransform(geom, backend="astra", check_finite=False)
            x = x_all[:1]
            add(size, n_angles, "astra", "cpu", 1,
                timeit(lambda: S.T(S(x)), min_time=min_time, max_repeats=reps), baseline)
        t0 = time.perf_counter()
        A = RayTransform(geom, check_finite=False)
        A(x_all[:1])  # builds or loads the matrix
        setup = time.perf_counter() - t0
        with torch.no_grad():
            for b in batches:
                x = x_all[:b]
                add(size, n_angles, "torch-sparse", "cpu", b,
                    timeit(lambda: A.T(A(x)), min_time=min_time, max_repeats=reps), baseline, setup)
            if torch.cuda.is_available():
                sync = torch.cuda.synchronize
                for method in ("sparse", "matrix_free", "fused"):
                    G = RayTransform(geom, method=method, check_finite=False)
                    for b in (1, 8, 32):
                        x = x_all[:b].cuda()
                        add(size, n_angles, f"torch-{method}", "cuda", b,
                            timeit(lambda: G.T(G(x)), min_time=0.2, max_repeats=20, sync=sync), baseline)

    lines = _table(rows)
    print("\n".join(lines))
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                quick=args.quick, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {out}")
    if args.quick:
        print(SMOKE_RUN)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
