"""Weak and strong scaling of one forward + backward pass on a DMDA grid, 1 to 4 ranks.

    .venv/bin/python benchmarks/grid_scaling.py            # launches mpiexec -n 1..4 itself

Case: a 2-D field of 2 channels, right-hand side conv 3x3 (2->16) -> tanh -> conv 3x3 (16->2),
periodic, halo 2; rk4, 10 steps, float64, one thread per rank. Weak scaling keeps a 96 x 96
patch per rank; strong scaling splits a 192 x 192 field. Each line is the median of 5 passes
after one warm-up; the time is split into halo exchange (scatters and their adjoints, measured
inside the exchange), the parameter-gradient allreduce, and the rest (compute). On this 2-core
machine 3 and 4 ranks are oversubscribed: their times show the sharing of cores, not the
method. The script ends with a model of the communication volume per step up to 1024 ranks.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATCH, STRONG, STEPS, HALO, CHANNELS, HIDDEN = 96, 192, 10, 2, 2, 16


def worker(shape, repeats):
    import torch
    from torch import nn

    from pnode_dist import Grid, odeint
    from pnode_dist.parallel import MPI
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.Conv2d(CHANNELS, HIDDEN, 3, padding=1, padding_mode="circular")
            self.b = nn.Conv2d(HIDDEN, CHANNELS, 3, padding=1, padding_mode="circular")

        def forward(self, t, y):
            return self.b(torch.tanh(self.a(y)))

    f = Field().double()
    grid = Grid(shape, channels=CHANNELS, periodic=True, halo=HALO)
    field = torch.randn((CHANNELS,) + tuple(shape), generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    rows = []
    for i in range(repeats + 1):
        y0 = grid.scatter(field).clone().requires_grad_(True)
        before = dict(grid.stats)
        stats = {}
        comm.Barrier()
        t0 = time.perf_counter()
        ys = odeint(f, y0, t, method="rk4", options={"step_size": 1.0 / STEPS}, grid=grid,
                    stats=stats)
        (ys[-1] ** 2).sum().backward()
        comm.Barrier()
        total = time.perf_counter() - t0
        halo = grid.stats["halo_seconds"] - before["halo_seconds"]
        reduce = stats.get("gradient_allreduce_seconds", 0.0)
        exchanges = (grid.stats["exchanges"] - before["exchanges"]
                     + grid.stats["adds"] - before["adds"])
        # the slowest rank's parts
        halo, reduce = comm.allreduce(halo, op=MPI.MAX), comm.allreduce(reduce, op=MPI.MAX)
        if i:
            rows.append((total, halo, reduce, exchanges))
    if comm.Get_rank() == 0:
        med = [statistics.median(r[k] for r in rows) for k in range(3)]
        nparams = sum(p.numel() for p in f.parameters())
        print(json.dumps({"total": med[0], "halo": med[1], "allreduce": med[2],
                          "scatters_per_step": rows[0][3] / STEPS, "nparams": nparams,
                          "proc_sizes": grid.proc_sizes, "local": grid.local_spatial}))


def launch(nranks, shape, repeats=5):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(["mpiexec", "-n", str(nranks), sys.executable, __file__, "--worker",
                          "--shape", *map(str, shape), "--repeats", str(repeats)],
                         capture_output=True, text=True, env=env, check=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def weak_shape(nranks):
    from mpi4py import MPI
    py, px = sorted(MPI.Compute_dims(nranks, 2), reverse=True)
    return (PATCH * py, PATCH * px)


def halo_values(n_local_y, n_local_x):
    """Values one rank receives per scatter with a box stencil: 4 edges and 4 corners."""
    return (2 * (n_local_y + n_local_x) * HALO + 4 * HALO * HALO) * CHANNELS


def model(scatters_per_step, nparams):
    print("\nCommunication model per rank and rk4 step, halo 2, 2 channels, float64 (volume "
          "grows with the patch perimeter; the allreduce is once per backward, log2(p) rounds):")
    print(f"{'ranks':>6} {'weak: patch':>12} {'halo MiB/step':>14} {'strong 4096^2: patch':>21} "
          f"{'halo MiB/step':>14} {'halo/compute':>13} {'allreduce rounds':>17}")
    for p in (1, 4, 16, 64, 256, 1024):
        side = int(math.isqrt(p))
        weak_bytes = scatters_per_step * halo_values(PATCH, PATCH) * 8 if p > 1 else 0
        local = 4096 // side
        strong_bytes = scatters_per_step * halo_values(local, local) * 8 if p > 1 else 0
        ratio = halo_values(local, local) / (local * local * CHANNELS) if p > 1 else 0.0
        print(f"{p:>6} {PATCH:>5} x {PATCH:<5} {weak_bytes / 2**20:>14.3f} "
              f"{local:>10} x {local:<9} {strong_bytes / 2**20:>14.3f} {ratio:>13.4f} "
              f"{math.ceil(math.log2(p)) if p > 1 else 0:>17}")
    print(f"(allreduce payload {nparams} parameters = {8 * nparams / 1024:.1f} KiB per backward)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", type=int, nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument("--max-ranks", type=int, default=4)
    args = p.parse_args()
    if args.worker:
        return worker(tuple(args.shape), args.repeats)
    print(__doc__.strip().splitlines()[0])
    results = {}
    for kind in ("weak", "strong"):
        print(f"\n{kind} scaling ({'patch %d^2 per rank' % PATCH if kind == 'weak' else 'field %d^2' % STRONG})")
        print(f"{'ranks':>5} {'grid':>11} {'procs':>7} {'total s':>8} {'halo s':>7} "
              f"{'allreduce s':>11} {'compute s':>9} {'T1/Tp':>6}")
        for n in range(1, args.max_ranks + 1):
            shape = weak_shape(n) if kind == "weak" else (STRONG, STRONG)
            r = launch(n, shape)
            results[(kind, n)] = r
            base = results[(kind, 1)]["total"]
            compute = r["total"] - r["halo"] - r["allreduce"]
            print(f"{n:>5} {shape[0]:>5}x{shape[1]:<5} {str(tuple(r['proc_sizes'])):>7} "
                  f"{r['total']:>8.3f} {r['halo']:>7.4f} {r['allreduce']:>11.5f} "
                  f"{compute:>9.3f} {base / r['total']:>6.2f}")
    last = results[("weak", 1)]
    model(last["scatters_per_step"], last["nparams"])


if __name__ == "__main__":
    main()
