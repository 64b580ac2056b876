"""A float32 model on the float64 solver (one cast per callback) against the same model on the
float32 build (PNODE_PRECISION=single: no casts, half the state and checkpoint bytes): time and
peak memory (RSS) of forward + backward. The precision is fixed when pnode_dist is imported, so
each measurement runs in its own process; the two alternate over `--rounds` and the ratios of
medians are printed.

    .venv/bin/python benchmarks/precision.py [--rounds 3] [--reps 5]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def measure(reps):
    """(median seconds, peak RSS growth in bytes) of forward + backward of a conv ODE block
    (float32 model) in this process's precision; PETSc's trajectory keeps every stage."""
    import resource

    import torch
    from torch import nn

    import pnode_dist
    torch.set_num_threads(1)
    torch.manual_seed(0)
    func = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(16, 16, 3, padding=1))
    block = pnode_dist.ODEBlock(lambda t, y: func(y), method="rk4", options={"step_size": 0.02},
                                comm="self")
    x = torch.randn(32, 16, 16, 16)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = []
    for _ in range(reps + 1):                   # the first run sets up the solver
        start = time.perf_counter()
        y = x.clone().requires_grad_(True)
        block(y).square().sum().backward()
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return statistics.median(seconds[1:]), peak


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.reps)))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    times = {"double": [], "single": []}
    for _ in range(args.rounds):
        for precision in times:
            env = dict(os.environ, PNODE_PRECISION=precision, OMP_NUM_THREADS="1",
                       PYTHONPATH=root)
            out = subprocess.run([sys.executable, __file__, "--measure", "--reps", str(args.reps)],
                                 capture_output=True, text=True, env=env, check=True)
            times[precision].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: statistics.median(s for s, _ in v) for k, v in times.items()}
    mem = {k: statistics.median(m for _, m in v) for k, v in times.items()}
    print("conv ODE block 16x16x16 (0.5 MiB in float32), batch 32, float32 model, rk4 50 steps, "
          f"forward + backward, 1 thread; median of {args.rounds} rounds x {args.reps} reps")
    for k in med:
        print(f"  {k:6s} PETSc build: {1e3 * med[k]:8.1f} ms, peak RSS growth "
              f"{mem[k] / 2**20:7.1f} MiB")
    print(f"  single / double: time {med['single'] / med['double']:.2f}, memory "
          f"{mem['single'] / mem['double']:.2f}")


if __name__ == "__main__":
    main()
