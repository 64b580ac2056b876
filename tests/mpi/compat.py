"""Run under mpiexec: torchdiffeq-style calls split over ranks equal the whole batch on one
rank: a tuple state (z, logp) integrated from t=1 down to t=0 (FFJORD's direction), a lambda
whose captured tensor gets its gradient summed over the ranks, and dL/dt of the output times. Exits non-zero on a
mismatch; prints 'worst relative difference'. Then second derivatives: refused on every rank
for the split batch (prints 'second derivatives refused on every rank'), given by a rank-local
solve."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__) + "/..")
from conftest import mpi_batch_problem  # noqa: E402

from pnode_dist import InputError, odeint  # noqa: E402
from pnode_dist.parallel import MPI  # noqa: E402

comm = MPI.COMM_WORLD
counts, lo, hi, y_all, t = mpi_batch_problem(comm)
t = t.flip(0)
w = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4),
                requires_grad=True)


def f(t, state):
    z, logp = state
    dz = torch.tanh(z @ w) * (1 + t)
    return dz, -(dz * z).sum(1, keepdim=True)


def gradients(rows, where):
    z0 = rows.clone().requires_grad_(True)
    lp0 = torch.zeros(len(rows), 1, dtype=torch.float64, requires_grad=True)
    times = t.clone().requires_grad_(True)
    zs, lps = odeint(f, (z0, lp0), times, method="dopri5", rtol=1e-8, atol=1e-10, comm=where)
    w.grad = None
    (zs.sin().sum() + lps.pow(2).sum()).backward()
    return zs.detach(), z0.grad, lp0.grad, w.grad.clone(), times.grad


dist = gradients(y_all[lo:hi], None)
whole = gradients(y_all, "self")
pairs = [(dist[0], whole[0][:, lo:hi]), (dist[1], whole[1][lo:hi]), (dist[2], whole[2][lo:hi]),
         (dist[3], whole[3]), (dist[4], whole[4])]
worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in pairs)
worst = comm.allreduce(worst, op=MPI.MAX)
if comm.Get_rank() == 0:
    print(f"worst relative difference {worst:.1e}", flush=True)


def second_order(where):
    z0 = y_all[lo:hi].clone().requires_grad_(True)
    zs = odeint(lambda s, z: torch.tanh(z @ w), z0, t, method="rk4", options={"step_size": 0.1},
                comm=where)
    g, = torch.autograd.grad(zs.square().sum(), z0, create_graph=True)
    return torch.autograd.grad(g.square().sum(), w)[0]


try:
    second_order(None)
    refused = False
except InputError as exc:
    refused = "supported on one rank" in str(exc)
local = second_order("self")
refused = comm.allreduce(int(refused), op=MPI.SUM) == comm.Get_size()
if comm.Get_rank() == 0 and refused and bool(torch.isfinite(local).all()):
    print("second derivatives refused on every rank", flush=True)
sys.exit(0 if worst <= 1e-12 else 1)
