"""Per-iteration time (forward + backward) of pnode_dist.odeint against torchdiffeq's odeint
(backprop) and odeint_adjoint, and against the limit: a pure-torch replay of exactly the f
evaluations and vjps that the discrete RK adjoint performs (stages stored in the forward pass, one
f-with-graph + one vjp per stage backward). One process, one thread, runs interleaved; ratios of
medians are printed (this machine is noisy: compare ratios, not seconds).

    .venv/bin/python benchmarks/overhead.py [--reps 15] [--steps 100] [--batch 256]
"""
import argparse
import statistics
import time

import torch
from torch import nn

from pnode_dist import METHODS, odeint


class MLP(nn.Module):
    def __init__(self, dim=32, hidden=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, t, y):
        return self.net(y)


def replay_limit(func, y0, h, steps, tableau, grad_out=None):
    """Forward with stored stages (no graph), then the discrete RK adjoint by hand, started from
    grad_out = dL/dy(T) (ones: L = sum(y(T)))."""
    params = list(func.parameters())
    s = tableau.stages
    stages = []
    y = y0.detach()
    with torch.no_grad():
        for n in range(steps):
            t = n * h
            Y, k = [], []
            for i in range(s):
                yi = y
                for j, a in enumerate(tableau.a[i]):
                    if a:
                        yi = yi + (h * a) * k[j]
                Y.append(yi)
                k.append(func(t + tableau.c[i] * h, yi))
            stages.append(Y)
            y = y + sum((h * b) * ki for b, ki in zip(tableau.b, k) if b)
    y_final = y
    lam = torch.ones_like(y0) if grad_out is None else grad_out.clone()
    mu = [torch.zeros_like(p) for p in params]
    for n in reversed(range(steps)):
        t = n * h
        w = [None] * s
        for i in reversed(range(s)):
            u = (h * tableau.b[i]) * lam
            for j in range(i + 1, s):
                if tableau.a[j][i]:
                    u = u + (h * tableau.a[j][i]) * w[j]
            yi = stages[n][i].requires_grad_(True)
            with torch.enable_grad():
                fi = func(t + tableau.c[i] * h, yi)
            grads = torch.autograd.grad(fi, [yi] + params, u)
            w[i] = grads[0]
            for m, g in zip(mu, grads[1:]):
                m.add_(g)
        lam = lam + sum(w)
    return y_final, lam, mu


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    func = MLP().double()
    y0 = torch.randn(args.batch, 32, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    h = 1.0 / args.steps
    tableau = METHODS["rk4"].tableau

    def pnode(store_graphs=None):
        def run():
            y = y0.clone().requires_grad_(True)
            out = odeint(func, y, t, method="rk4", options={"step_size": h},
                         store_graphs=store_graphs)[-1]
            out.sum().backward()
            return y.grad
        return run

    def limit():
        _, lam, mu = replay_limit(func, y0, h, args.steps, tableau)
        for p_, m in zip(func.parameters(), mu):
            p_.grad = m
        return lam

    cases = {"pnode_dist": pnode(), "pnode_dist store_graphs=False": pnode(False),
             "limit (replay)": limit}
    try:
        import torchdiffeq

        def tdq(solver):
            def run():
                y = y0.clone().requires_grad_(True)
                out = solver(func, y, t, method="rk4", options={"step_size": h})[-1]
                out.sum().backward()
                return y.grad
            return run
        cases["torchdiffeq odeint"] = tdq(torchdiffeq.odeint)
        cases["torchdiffeq odeint_adjoint"] = tdq(torchdiffeq.odeint_adjoint)
    except ImportError:
        print("torchdiffeq not installed: comparing with the replay limit only")

    # Same gradients first (the benchmark is meaningless otherwise).
    ref = None
    for name, fn in cases.items():
        func.zero_grad()
        g = fn()
        if ref is None:
            ref = g
        print(f"check {name:28s} max |dy0 - dy0(pnode)| = {(g - ref).abs().max().item():.1e}")

    times = {name: [] for name in cases}
    for _ in range(args.reps):
        for name, fn in cases.items():
            func.zero_grad()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"\nMLP 32-128-32, batch {args.batch}, rk4, {args.steps} steps, float64, 1 thread, "
          f"median of {args.reps}")
    for name, m in med.items():
        print(f"  {name:28s} {1e3 * m:8.1f} ms")
    for mine in ("pnode_dist", "pnode_dist store_graphs=False"):
        print(f"ratios ({mine} / other):")
        for name, m in med.items():
            if not name.startswith("pnode_dist"):
                print(f"  {mine} / {name:28s} = {med[mine] / m:5.2f}")


if __name__ == "__main__":
    main()
