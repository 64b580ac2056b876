"""Stiff batched problem (Robertson's kinetics, 32 initial states, t in [0, 10] on a log grid):
forward + backward with the implicit method (one step per grid interval) and the exact per-sample
Newton, with matrix-free GMRES Newton, with the adaptive kencarp3/4/5 (exact Newton) at the
loosest rtol of 1e-3, 1e-4, ... that is at least as accurate, and with the best explicit method
(adaptive dopri5) at an accuracy at least as good.
Prints wall time and the counts of f evaluations, jvps, vjps and Jacobian blocks, and ratios.

    .venv/bin/python benchmarks/stiff.py [--method cn] [--batch 32] [--reps 3]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "apps"))
from stiff import SCALE, Robertson, reference_data  # noqa: E402

from pnode_dist import odeint  # noqa: E402


def run_case(f, y0, grid, ref, method, options, tolerances, reps):
    stats, times = {}, []
    for _ in range(reps + 1):          # the first run warms torch.func up and is not timed
        y = y0.clone().requires_grad_(True)
        t0 = time.perf_counter()
        ys = odeint(f, y, grid, method=method, comm="self", options=options, stats=stats,
                    **tolerances)
        ys[-1].sum().backward()
        times.append(time.perf_counter() - t0)
    times = times[1:] or times
    error = ((ys[1:].detach() - ref) / SCALE).abs().max().item()
    calls = {k: stats.get(k, 0) + stats.get(f"adjoint_{k}", 0)
             for k in ("f_evaluations", "jvps", "vjps", "jacobian_blocks")}
    return {"seconds": statistics.median(times), "steps": stats["steps"], "error": error,
            "newton": stats["newton_iterations"], "krylov": stats["linear_iterations"], **calls}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--method", default="cn", choices=["cn", "beuler"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--t-end", type=float, default=10.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    y0 = torch.zeros(args.batch, 3, dtype=torch.float64)
    y0[:, 0] = 1.0 - 0.3 * torch.rand(args.batch, generator=gen, dtype=torch.float64)
    y0[:, 2] = 1.0 - y0[:, 0]
    times = torch.logspace(-5, 1, 4 * 6 + 1, dtype=torch.float64)
    times = times[times <= args.t_end]
    grid = torch.cat([torch.zeros(1, dtype=torch.float64), times])
    ref = reference_data(y0, times.numpy())
    f = Robertson()
    results = {}
    one_step = args.t_end     # one implicit step per log-grid interval
    results[f"{args.method} exact Newton"] = run_case(
        f, y0, grid, ref, args.method, {"linear_solver": "exact", "step_size": one_step}, {},
        args.reps)
    results[f"{args.method} GMRES Newton"] = run_case(
        f, y0, grid, ref, args.method, {"linear_solver": "gmres", "step_size": one_step}, {},
        args.reps)
    target = results[f"{args.method} exact Newton"]["error"]
    for method in ("kencarp3", "kencarp4", "kencarp5"):    # adaptive, at least as accurate
        for rtol in (1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
            r = run_case(f, y0, grid, ref, method, {"linear_solver": "exact"},
                         {"rtol": rtol, "atol": rtol * float(SCALE[1])}, args.reps)
            if r["error"] <= target:
                results[f"{method} rtol {rtol:.0e}"] = r
                break
    tol = target / 10
    results["dopri5 (adaptive)"] = run_case(
        f, y0, grid, ref, "dopri5", {"max_num_steps": 1_000_000},
        {"rtol": tol, "atol": tol * float(SCALE[1])}, 0)
    print(f"Robertson, batch {args.batch}, t in [0, {args.t_end:g}], forward + backward, "
          "1 thread (median seconds; counts are forward + adjoint)")
    cols = ("seconds", "error", "steps", "newton", "krylov", "f_evaluations", "jvps", "vjps",
            "jacobian_blocks")
    print(f"{'':26s}" + "".join(f"{c:>16s}" for c in cols))
    for name, r in results.items():
        print(f"{name:26s}" + "".join(f"{r[c]:16.3g}" if isinstance(r[c], float)
                                      else f"{r[c]:16d}" for c in cols))
    base = results[f"{args.method} exact Newton"]
    print("ratios (other / exact Newton):")
    for name, r in results.items():
        if r is not base:
            print(f"  {name:22s} time {r['seconds'] / base['seconds']:7.1f}x   "
                  f"steps {r['steps'] / base['steps']:7.1f}x   "
                  f"f+jvp+vjp calls {(r['f_evaluations'] + r['jvps'] + r['vjps']) / max(1, base['f_evaluations'] + base['jvps'] + base['vjps']):7.1f}x")


if __name__ == "__main__":
    main()
