"""Peak resident memory and time per iteration (forward + backward) against the number of steps:
store-all (PETSc's memory trajectory), binomial checkpointing with a fixed slot count, and
torchdiffeq backprop; then the binomial run with every checkpoint forced to the HDF5 disk tier
against the same run in memory, interleaved in one process.

Each (mode, steps) runs in its own process (peak RSS is a per-process high-water mark), one
thread. Prints a table and the ratios the bounded-memory issue targets: binomial peak memory at
the most steps / at the fewest (flat: <= 1.05), disk / memory time (<= 1.2).

    .venv/bin/python benchmarks/memory.py [--steps 10 100 1000] [--slots 20] [--batch 512]
                                          [--disk-steps 200] [--reps 2]
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

DIM, HIDDEN = 64, 128


def status_bytes(field):
    """VmRSS (now) or VmHWM (high-water mark) of this process. Not getrusage's ru_maxrss: Linux
    carries that over an exec, so a child would report its parent's peak when it was forked."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, DIM))

    def forward(self, t, y):
        return self.net(y)


def _iteration(mode, func, y0, steps, policy=None, stats=None):
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    y = y0.clone().requires_grad_(True)
    start = time.perf_counter()
    if mode == "torchdiffeq":
        import torchdiffeq
        ys = torchdiffeq.odeint(func, y, t, method="rk4", options={"step_size": 1.0 / steps})
    else:
        from pnode_dist import odeint
        ys = odeint(func, y, t, method="rk4", options={"step_size": 1.0 / steps},
                    checkpointing=policy, stats=stats)
    ys[-1].square().sum().backward()
    return time.perf_counter() - start


def child(mode, steps, slots, batch, reps):
    """One configuration in this process: prints a JSON line with time and peak RSS."""
    from pnode_dist import Checkpointing
    torch.set_num_threads(1)
    torch.manual_seed(0)
    func = MLP().double()
    y0 = torch.randn(batch, DIM, dtype=torch.float64)
    disk = tempfile.mkdtemp(prefix="pnode-bench-")
    policies = {"store-all": Checkpointing(schedule="all"), "torchdiffeq": None,
                "binomial": Checkpointing(schedule="binomial", slots=slots),
                "disk": Checkpointing(schedule="binomial", slots=slots, host_bytes=0,
                                      disk_dir=disk)}
    stats = {}
    if mode == "disk-vs-memory":
        times = {"disk": [], "binomial": []}
        for name in ("binomial", "disk"):                     # warm-up
            _iteration("pnode", func, y0, steps, policies[name])
        for _ in range(max(reps, 3)):
            for name in ("binomial", "disk"):
                s = {}
                times[name].append(_iteration("pnode", func, y0, steps, policies[name], s))
                if name == "disk":
                    stats = s
        out = {k: statistics.median(v) for k, v in times.items()}
        out.update(stats={k: round(v, 4) for k, v in stats.items() if k.startswith("disk_")})
    else:
        _iteration(mode, func, y0, steps, policies[mode], stats)
        times = [_iteration(mode, func, y0, steps, policies[mode], stats) for _ in range(reps)]
        out = {"time": statistics.median(times),
               "recomputed": stats.get("recomputed_steps", 0),
               "store_mib": stats.get("host_bytes_peak", 0) / 2 ** 20}
    out["peak_rss_mib"] = status_bytes("VmHWM") / 2 ** 20
    print(json.dumps(out))


def _run(mode, steps, args):
    cmd = [sys.executable, __file__, "--child", mode, "--steps", str(steps), "--slots",
           str(args.slots), "--batch", str(args.batch), "--reps", str(args.reps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1",
                                                                    **__import__("os").environ})
    if proc.returncode != 0:
        raise SystemExit(f"{mode} with {steps} steps failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--slots", type=int, default=20)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--disk-steps", type=int, default=200,
                        help="steps of the disk-versus-memory comparison")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps[0], args.slots, args.batch, args.reps)
        return
    state_mib = args.batch * DIM * 8 / 2 ** 20
    print(f"rk4, MLP {DIM}-{HIDDEN}-{DIM}, batch {args.batch} (state {state_mib:.2f} MiB), "
          f"float64, 1 thread, binomial with {args.slots} slots; median of {args.reps}")
    print(f"{'steps':>6} | {'mode':>12} | {'peak RSS MiB':>12} | {'store MiB':>9} | "
          f"{'s / iteration':>13} | {'re-run steps':>12}")
    peaks = {}
    for steps in args.steps:
        for mode in ("store-all", "binomial", "torchdiffeq"):
            r = _run(mode, steps, args)
            peaks[mode, steps] = r["peak_rss_mib"]
            store = f"{r['store_mib']:.2f}" if mode == "binomial" else "-"
            print(f"{steps:>6} | {mode:>12} | {r['peak_rss_mib']:>12.1f} | {store:>9} | "
                  f"{r['time']:>13.3f} | {r['recomputed']:>12}", flush=True)
    lo, hi = min(args.steps), max(args.steps)
    print(f"binomial peak RSS, {hi} steps / {lo} steps: "
          f"{peaks['binomial', hi] / peaks['binomial', lo]:.3f}  (target <= 1.05)")
    print(f"store-all peak RSS, {hi} / {lo} steps: "
          f"{peaks['store-all', hi] / peaks['store-all', lo]:.2f};  torchdiffeq: "
          f"{peaks['torchdiffeq', hi] / peaks['torchdiffeq', lo]:.2f}")
    r = _run("disk-vs-memory", args.disk_steps, args)
    print(f"binomial, {args.disk_steps} steps, all checkpoints on disk / in memory: "
          f"{r['disk'] / r['binomial']:.3f}  (target <= 1.2); {r['stats']}")


if __name__ == "__main__":
    main()
