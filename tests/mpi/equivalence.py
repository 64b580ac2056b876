"""Run under mpiexec: a batch split unevenly over the ranks gives the same outputs and gradients
(and adaptive steps) as the whole batch solved on one rank (each rank also solves the whole batch with comm='self').
Exits non-zero on any mismatch."""
import sys

import torch

sys.path.insert(0, __import__("os").path.dirname(__file__) + "/..")
from conftest import TimeMLP, mpi_batch_problem  # noqa: E402

from pnode_dist import IMEX, odeint  # noqa: E402
from pnode_dist.parallel import MPI  # noqa: E402

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
counts, lo, hi, y_all, t = mpi_batch_problem(comm)
worst = 0.0

CASES = [("rk4", {"step_size": 0.1}, False), ("euler", {"step_size": 0.1}, False),
         ("dopri5", None, False), ("bosh3", None, False), ("rk4", {"step_size": 0.1}, True),
         ("beuler", {"step_size": 0.1, "linear_solver": "exact"}, False),
         ("cn", {"step_size": 0.1}, False),
         ("cn", {"linear_solver": "exact"}, False),           # adaptive: the trapezoid's control
         ("kencarp4", {"linear_solver": "exact"}, False),
         ("kvaerno5", {"linear_solver": "exact"}, False),
         ("arkimex", {"step_size": 0.1, "linear_solver": "exact"}, False)]


def make_func(method):
    if method == "arkimex":
        return IMEX(TimeMLP(seed=3), TimeMLP(seed=5))
    return TimeMLP(seed=3)


for method, options, store in CASES:
    results = {}
    for mode in ("dist", "serial"):
        f = make_func(method)
        y0 = (y_all[lo:hi] if mode == "dist" else y_all).clone().requires_grad_(True)
        ys = odeint(f, y0, t, method=method, options=options, rtol=1e-6, atol=1e-8,
                    comm=None if mode == "dist" else "self", store_graphs=store)
        loss = (ys.sin() * torch.arange(1, 4, dtype=ys.dtype).view(3, 1, 1)).sum()
        loss.backward()
        results[mode] = (ys.detach(), y0.grad, [p.grad.clone() for p in f.parameters()])
    ys_d, gy_d, gp_d = results["dist"]
    ys_s, gy_s, gp_s = results["serial"]
    errs = [(ys_d - ys_s[:, lo:hi]).abs().max() / ys_s.abs().max(),
            (gy_d - gy_s[lo:hi]).abs().max() / gy_s.abs().max()]
    errs += [(a - b).abs().max() / b.abs().max() for a, b in zip(gp_d, gp_s)]
    err = max(float(e) for e in errs)
    worst = max(worst, err)
    if err > 1e-12:
        print(f"rank {rank} {method}: relative mismatch {err:.2e}", flush=True)

worst = comm.allreduce(worst, op=MPI.MAX)
if rank == 0:
    print(f"ranks={size} counts={counts} worst relative difference {worst:.2e}")
sys.exit(0 if worst <= 1e-12 else 1)
