"""The time / memory front of reverse-mode ODE gradients: every pnode_dist setting against
torchdiffeq's backprop and odeint_adjoint and the replay limit, at 10, 100 and 1000 steps.

    .venv/bin/python benchmarks/front.py [--steps 10 100 1000] [--reps 3] [--plot front.png]

Case (as benchmarks/overhead.py): MLP 32-128-32, batch 256, rk4, float64, one thread, one
forward + backward per iteration. Memory: each (setting, steps) point runs in its own process;
"peak" is the growth of the resident set during its iterations over the resident set after a
one-step warm-up of the same setting (imports, PETSc, workspaces excluded). Time: all settings
of one step count run interleaved in one process (each round in a rotated order), median of
--reps rounds (x 100/steps below 100 steps). Prints a table per step count (time and peak, each
also as a ratio to torchdiffeq backprop, and the plan 'auto' chose), checks the targets of the
memory-aware default, and writes a plot of time against peak memory, one marker per setting.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import status_bytes  # noqa: E402
from overhead import MLP, replay_limit  # noqa: E402

BATCH, DIM = 256, 32
SLOTS = (20, 5)
BUDGETS_MIB = (64, 16, 4)          # Checkpointing(memory=...) levels, MiB
PEERS = ("torchdiffeq backprop", "torchdiffeq odeint_adjoint")


def settings():
    """name -> make(func, y0, steps) returning one forward + backward as a function."""
    from pnode_dist import METHODS, Checkpointing, odeint
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def pnode(**kwargs):
        def make(func, y0, steps, stats=None):
            def run():
                y = y0.clone().requires_grad_(True)
                odeint(func, y, t, method="rk4", options={"step_size": 1.0 / steps},
                       stats=stats, **kwargs)[-1].square().sum().backward()
            return run
        return make

    def torchdiffeq(adjoint):
        def make(func, y0, steps, stats=None):
            import torchdiffeq as tdq
            solver = tdq.odeint_adjoint if adjoint else tdq.odeint

            def run():
                y = y0.clone().requires_grad_(True)
                solver(func, y, t, method="rk4",
                       options={"step_size": 1.0 / steps})[-1].square().sum().backward()
            return run
        return make

    def limit(func, y0, steps, stats=None):
        return lambda: replay_limit(func, y0, 1.0 / steps, steps, METHODS["rk4"].tableau)

    out = {"default": pnode(), "store_graphs": pnode(store_graphs=True),
           "all, no graphs": pnode(checkpointing=Checkpointing(schedule="all"))}
    for mib in BUDGETS_MIB:
        out[f"memory={mib} MiB"] = pnode(checkpointing=Checkpointing(memory=mib << 20))
    for slots in SLOTS:
        out[f"binomial({slots})"] = pnode(checkpointing=Checkpointing(schedule="binomial",
                                                                      slots=slots))
    out["torchdiffeq backprop"] = torchdiffeq(False)
    out["torchdiffeq odeint_adjoint"] = torchdiffeq(True)
    out["replay limit"] = limit
    return out


def _case():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    return MLP(DIM).double(), torch.randn(BATCH, DIM, dtype=torch.float64)


def memory_child(name, steps):
    """One point in this process: its peak resident-set growth, as a JSON line."""
    func, y0 = _case()
    make = settings()[name]
    make(func, y0, 1)()                        # warm-up: imports, PETSc, first allocations
    base = status_bytes("VmRSS")
    stats = {}
    make(func, y0, steps, stats)()
    peak = status_bytes("VmHWM") - base
    print(json.dumps({"peak_bytes": max(peak, 0),
                      "plan": stats.get("checkpoint_schedule"),
                      "budget": stats.get("memory_budget")}))


def memory(name, steps):
    proc = subprocess.run([sys.executable, __file__, "--memory-child", name, "--steps",
                           str(steps)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{name} at {steps} steps failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def times(steps, reps):
    """Median seconds per iteration of every setting, interleaved in this process."""
    func, y0 = _case()
    runs = {name: make(func, y0, steps) for name, make in settings().items()}
    samples = {name: [] for name in runs}
    for name, run in runs.items():             # warm-up
        run()
    names = list(runs)
    for rep in range(reps * max(1, 100 // steps)):   # short runs: more repetitions
        for name in names[rep % len(names):] + names[:rep % len(names)]:    # rotated order
            run = runs[name]
            func.zero_grad()
            t0 = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def targets(rows, budget):
    """The front's targets: the default within 1.1x of the fastest setting that fits its
    budget; at every peer's point, a pnode_dist setting with <= its memory at <= 1.1x its time,
    or <= its time at <= 1.1x its memory."""
    mine = {n: v for n, v in rows.items() if not n.startswith(("torchdiffeq", "replay"))}
    fitting = {n: v for n, v in mine.items() if v[1] <= budget}
    fastest = min(fitting, key=lambda n: fitting[n][0])
    ratio = rows["default"][0] / fitting[fastest][0]
    print(f"{'':12}target: default {ratio:.2f}x the time of the fastest setting within its "
          f"budget ({fastest}) [{'met' if ratio <= 1.1 else 'NOT met'}]")
    for peer in PEERS:
        s0, m0 = rows[peer]
        best = [(s / s0, m / m0, n) for n, (s, m) in mine.items()
                if (m <= m0 and s <= 1.1 * s0) or (s <= s0 and m <= 1.1 * m0)]
        if best:
            s, m, n = min(best)
            print(f"{'':12}target at {peer}: {n} at {s:.2f}x its time, {m:.2f}x its memory "
                  "[met]")
        else:
            m, s, n = min((m / m0, s / s0, n) for n, (s, m) in mine.items())
            print(f"{'':12}target at {peer}: NOT met; the least memory is {n}'s, {m:.2f}x "
                  f"its memory at {s:.2f}x its time")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.5), squeeze=False)
    for ax, (steps, rows) in zip(axes[0], results.items()):
        for name, (seconds, peak) in rows.items():
            peer = name.startswith(("torchdiffeq", "replay"))
            ax.scatter(peak / 2 ** 20, seconds, marker="s" if peer else "o",
                       color="tab:gray" if peer else "tab:blue")
            ax.annotate(name, (peak / 2 ** 20, seconds), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("peak memory growth (MiB)")
        ax.set_ylabel("seconds per forward + backward")
        ax.set_title(f"{steps} rk4 steps")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--plot", default="docs/front.png")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.steps[0])
    print(f"MLP {DIM}-128-{DIM}, batch {BATCH}, rk4, float64, 1 thread; time: median of "
          f"{args.reps}, interleaved; peak: resident-set growth, one process per point")
    results = {}
    for steps in args.steps:
        seconds = times(steps, args.reps)
        points = {name: memory(name, steps) for name in seconds}
        rows = results[steps] = {name: (s, points[name]["peak_bytes"])
                                 for name, s in seconds.items()}
        base_s, base_m = rows["torchdiffeq backprop"]
        print(f"\n{steps} steps: {'setting':34} {'s/iter':>8} {'/backprop':>9} "
              f"{'peak MiB':>9} {'/backprop':>9}  plan")
        for name, (s, m) in rows.items():
            print(f"{'':12}{name:34} {s:8.3f} {s / base_s:9.2f} {m / 2 ** 20:9.1f} "
                  f"{m / base_m:9.2f}  {points[name]['plan'] or ''}", flush=True)
        targets(rows, points["default"]["budget"])
    plot(results, args.plot)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
