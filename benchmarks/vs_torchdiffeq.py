"""pnode_dist.odeint against torchdiffeq's odeint (backprop) on the small problems torchdiffeq's
users train, and the step controllers side by side on DETEST-like problems.

Part 1, training cases (forward + backward per iteration; one process, one thread, runs
interleaved, medians; this machine is noisy: compare the ratios):
  ode_demo    2-D state, MLP 2-50-2 on y^3 (torchdiffeq's examples/ode_demo.py), batch 20,
              10 output times over [0, 0.225], dopri5 rtol 1e-7 atol 1e-9
  latent      4-D latent, MLP 4-20-4 (torchdiffeq's examples/latent_ode.py), batch 1 and
              1000 (the example's), 100 output times over [0, 6.3], dopri5 rtol 1e-7 atol 1e-9
  fixed_rk4   MLP 24-96-24 (softplus), batch 192, 50 fixed rk4 (3/8 rule) steps, 3 outputs
Part 2, DETEST-like problems (no gradient): accepted and rejected steps, f calls, and the
largest error at the output times against a reference solved at rtol 1e-13, for both at the
same rtol/atol.

    .venv/bin/python benchmarks/vs_torchdiffeq.py [--reps 21] [--part 1|2] [--method bosh3]
"""
import argparse
import math
import statistics
import time

import torch
import torchdiffeq
from torch import nn

import pnode_dist

F64 = torch.float64


class Counted(nn.Module):
    """f with a call counter (torchdiffeq and pnode_dist call the same module)."""

    def __init__(self, net, cube=False):
        super().__init__()
        self.net, self.cube, self.calls = net, cube, 0

    def forward(self, t, y):
        self.calls += 1
        return self.net(y ** 3 if self.cube else y)


def _mlp(sizes, act):
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1]).double()


def training_cases():
    torch.manual_seed(0)
    cases = []
    f = Counted(_mlp([2, 50, 2], nn.Tanh), cube=True)
    cases.append(("ode_demo: 2-D, batch 20, 10 outputs", f,
                  torch.randn(20, 2, dtype=F64), torch.linspace(0, 0.225, 10, dtype=F64),
                  {}, {}))
    f = Counted(_mlp([4, 20, 4], nn.ELU))
    cases.append(("latent: 4-D, batch 1, 100 outputs", f, torch.randn(1, 4, dtype=F64),
                  torch.linspace(0, 6.3, 100, dtype=F64), {}, {}))
    cases.append(("latent: 4-D, batch 1000, 100 outputs", f,
                  torch.randn(1000, 4, dtype=F64) * 0.5,
                  torch.linspace(0, 6.3, 100, dtype=F64), {}, {}))
    f = Counted(_mlp([24, 96, 24], nn.Softplus))
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    cases.append(("fixed rk4: MLP 24-96-24, batch 192, 50 steps", f,
                  torch.randn(192, 24, dtype=F64), t,
                  dict(method="rk4", options={"step_size": 0.02}),
                  dict(method="rk4_38", options={"step_size": 0.02})))
    return cases


def _iteration(odeint, f, y0, t, kw):
    y = y0.clone().requires_grad_(True)
    f.zero_grad()
    f.calls = 0
    ys = odeint(f, y, t, **kw)
    forward_calls = f.calls
    (ys ** 2).sum().backward()
    return forward_calls, f.calls - forward_calls


def part1(reps):
    print("Part 1: forward + backward per iteration (median of interleaved runs, 1 thread)")
    print(f"{'case':48s} {'torchdiffeq':>12s} {'pnode_dist':>12s} {'ratio':>6s}  "
          f"{'f calls tdq (fwd+bwd)':>22s} {'pnode (fwd+adj)':>16s}")
    for name, f, y0, t, tdq_kw, our_kw in training_cases():
        runners = {"tdq": (torchdiffeq.odeint, tdq_kw), "ours": (pnode_dist.odeint, our_kw)}
        times = {k: [] for k in runners}
        calls = {}
        for k, (fn, kw) in runners.items():         # warm-up (solver cache, allocations)
            _iteration(fn, f, y0, t, kw)
        for _ in range(reps):
            for k, (fn, kw) in runners.items():
                start = time.perf_counter()
                calls[k] = _iteration(fn, f, y0, t, kw)
                times[k].append(time.perf_counter() - start)
        a, b = statistics.median(times["tdq"]), statistics.median(times["ours"])
        print(f"{name:48s} {a * 1e3:10.1f}ms {b * 1e3:10.1f}ms {b / a:6.2f}  "
              f"{calls['tdq'][0]:>12d}+{calls['tdq'][1]:<9d} "
              f"{calls['ours'][0]:>6d}+{calls['ours'][1]:<9d}")


# ---------------------------------------------------------------- DETEST-like problems
class Problem(nn.Module):
    def __init__(self, name, rhs, y0, t_end, outputs=20):
        super().__init__()
        self.name, self.rhs, self.calls = name, rhs, 0
        self.y0 = torch.tensor([y0], dtype=F64)
        self.t = torch.linspace(0, t_end, outputs + 1, dtype=F64)
        self.accepted = self.rejected = 0

    def forward(self, t, y):
        self.calls += 1
        return self.rhs(t, y)

    # torchdiffeq's step callbacks (pnode_dist reports steps in stats)
    def callback_accept_step(self, t, y, dt):
        self.accepted += 1

    def callback_reject_step(self, t, y, dt):
        self.rejected += 1


def _orbit(e):
    def rhs(t, y):
        x, z, vx, vz = y.unbind(-1)
        r3 = (x * x + z * z) ** 1.5
        return torch.stack([vx, vz, -x / r3, -z / r3], -1)
    return rhs, [1 - e, 0.0, 0.0, math.sqrt((1 + e) / (1 - e))]


def problems():
    d1, d1y = _orbit(0.1)
    d5, d5y = _orbit(0.9)
    return [
        Problem("A1 decay y'=-y", lambda t, y: -y, [1.0], 20.0),
        Problem("A3 y'=y cos t", lambda t, y: y * torch.cos(t), [1.0], 20.0),
        Problem("B1 Lotka-Volterra", lambda t, y: torch.stack(
            [2 * (y[..., 0] - y[..., 0] * y[..., 1]), -(y[..., 1] - y[..., 0] * y[..., 1])], -1),
            [1.0, 3.0], 20.0),
        Problem("B5 Euler rigid body", lambda t, y: torch.stack(
            [y[..., 1] * y[..., 2], -y[..., 0] * y[..., 2], -0.51 * y[..., 0] * y[..., 1]], -1),
            [0.0, 1.0, 1.0], 20.0),
        Problem("D1 orbit e=0.1", d1, d1y, 20.0),
        Problem("D5 orbit e=0.9", d5, d5y, 20.0),
        Problem("E van der Pol mu=1", lambda t, y: torch.stack(
            [y[..., 1], (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1), [2.0, 0.0], 20.0),
    ]


def part2(method="dopri5"):
    print(f"\nPart 2: DETEST-like problems, {method}, 21 output times, no gradient")
    print(f"{'problem':24s} {'rtol':>6s} | {'tdq steps/rej/f':>16s} {'error':>8s} | "
          f"{'pnode steps/rej/f':>17s} {'error':>8s}")
    totals = {"tdq": 0, "ours": 0}
    worse = 0
    for p in problems():
        with torch.no_grad():
            ref = pnode_dist.odeint(p, p.y0, p.t, method="verner8", rtol=1e-13, atol=1e-15,
                                    options={"outputs": "land"})
        for rtol in (1e-4, 1e-7, 1e-10):
            atol = rtol * 1e-2
            p.calls = p.accepted = p.rejected = 0
            with torch.no_grad():
                ys = torchdiffeq.odeint(p, p.y0, p.t, rtol=rtol, atol=atol, method=method)
            tdq = (p.accepted, p.rejected, p.calls, float((ys - ref).abs().max()))
            p.calls = 0
            stats = {}
            with torch.no_grad():
                ys = pnode_dist.odeint(p, p.y0, p.t, rtol=rtol, atol=atol, stats=stats,
                                       method=method)
            ours = (stats["steps"], stats["rejected_steps"], p.calls,
                    float((ys - ref).abs().max()))
            totals["tdq"] += tdq[2]
            totals["ours"] += ours[2]
            worse += ours[3] > 2 * tdq[3]
            print(f"{p.name:24s} {rtol:6.0e} | {tdq[0]:6d}/{tdq[1]:3d}/{tdq[2]:5d} "
                  f"{tdq[3]:8.1e} | {ours[0]:6d}/{ours[1]:3d}/{ours[2]:6d} {ours[3]:8.1e}")
    print(f"f calls in all: torchdiffeq {totals['tdq']}, pnode_dist {totals['ours']} "
          f"(ratio {totals['ours'] / totals['tdq']:.2f}); cases with error > 2x torchdiffeq's: "
          f"{worse}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--part", type=int, choices=(1, 2))
    parser.add_argument("--method", default="dopri5",
                        choices=("dopri5", "bosh3", "fehlberg2", "adaptive_heun"),
                        help="part 2's method (both libraries; torchdiffeq 0.2.5 has no tsit5)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.part in (None, 1):
        part1(args.reps)
    if args.part in (None, 2):
        part2(args.method)


if __name__ == "__main__":
    main()
