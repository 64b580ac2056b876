"""Run under mpiexec: bounded-memory schedules (binomial and uniform, host and disk tiers) give
the gradients of the store-everything run on the same ranks (<= 1e-14 relative) and of the
whole batch on one rank (<= 1e-12), and leave no files behind. Exits non-zero on a mismatch."""
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__) + "/..")
from conftest import TimeMLP, mpi_batch_problem  # noqa: E402

from pnode_dist import Checkpointing, odeint  # noqa: E402
from pnode_dist.parallel import MPI  # noqa: E402

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
counts, lo, hi, y_all, t = mpi_batch_problem(comm)
disk = comm.bcast(tempfile.mkdtemp(prefix="pnode-ckpt-") if rank == 0 else None, root=0)
STATE = 8 * 3 * max(counts)
POLICIES = {"default": None, "all": Checkpointing(schedule="all"),
            "binomial-disk": Checkpointing(schedule="binomial", slots=3, host_bytes=STATE,
                                           disk_dir=disk),
            "uniform-disk": Checkpointing(schedule="uniform", slots=3, host_bytes=0,
                                          disk_dir=disk)}
CASES = [("rk4", {"step_size": 0.1}), ("dopri5", None), ("cn", {"step_size": 0.1}),
         ("beuler", {"step_size": 0.1, "linear_solver": "exact"})]


def gradients(method, options, policy, mode):
    f = TimeMLP(seed=3)
    y0 = (y_all[lo:hi] if mode == "dist" else y_all).clone().requires_grad_(True)
    ys = odeint(f, y0, t, method=method, options=options, rtol=1e-6, atol=1e-8,
                comm=None if mode == "dist" else "self", checkpointing=policy)
    (ys.sin() * torch.arange(1, 4, dtype=ys.dtype).view(3, 1, 1)).sum().backward()
    g = y0.grad if mode == "dist" else y0.grad[lo:hi]
    return torch.cat([g.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()])


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


worst_schedule = worst_ranks = 0.0
for method, options in CASES:
    ref = gradients(method, options, None, "dist")
    for name, policy in POLICIES.items():
        g = gradients(method, options, policy, "dist")
        worst_schedule = max(worst_schedule, rel(g, ref))
        worst_ranks = max(worst_ranks, rel(g, gradients(method, options, policy, "serial")))
        if rel(g, ref) > 1e-14:
            print(f"rank {rank} {method} {name}: {rel(g, ref):.2e} from store-all", flush=True)
comm.Barrier()                       # the serial solves of other ranks may still be running
leftover = len(os.listdir(disk))
worst_schedule = comm.allreduce(worst_schedule, op=MPI.MAX)
worst_ranks = comm.allreduce(worst_ranks, op=MPI.MAX)
leftover = comm.allreduce(leftover, op=MPI.SUM)
if rank == 0:
    shutil.rmtree(disk)
    print(f"ranks={size} schedules vs store-all {worst_schedule:.2e}, "
          f"{size} ranks vs 1 rank {worst_ranks:.2e}, files left {leftover}")
sys.exit(0 if worst_schedule <= 1e-14 and worst_ranks <= 1e-12 and leftover == 0 else 1)
